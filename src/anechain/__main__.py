from anechain.cli import cli

cli()
