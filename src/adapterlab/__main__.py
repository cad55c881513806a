from adapterlab.cli import app

app()
