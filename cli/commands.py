"""The typer app with every command registered: `cli.app` (`from cli import app`)."""

from cli import eval, offpolicy, onpolicy, plan, report, rl, run, students  # noqa: F401  (commands)
from cli.root import app
from cli.students import students_app
from cli.teacher import teacher_app

app.add_typer(teacher_app, name="teacher")
app.add_typer(students_app, name="students")

__all__ = ["app"]
