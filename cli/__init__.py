"""distill's command line. The only package that renders with rich.

distill run                      # the whole pipeline on the embedded default
distill --help
"""

from cli import eval, offpolicy, onpolicy, plan, report, rl, run, students  # noqa: F401  (commands)
from cli.app import app
from cli.students import students_app
from cli.teacher import teacher_app

app.add_typer(teacher_app, name="teacher")
app.add_typer(students_app, name="students")

__all__ = ["app"]
