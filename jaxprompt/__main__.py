"""``python -m jaxprompt``: the ``jaxprompt`` command."""

from jaxprompt.cli import run

if __name__ == "__main__":
    run()
