from gptcore.cli import run

run()
