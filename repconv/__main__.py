from repconv.cli import app

app(prog_name="repconv")
