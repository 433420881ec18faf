"""``python -m segpipe.cli``: the ``segpipe`` command."""

from segpipe.cli import command

if __name__ == "__main__":
    command()
