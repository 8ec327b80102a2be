"""`python -m lorasurgeon` and the `lorasurgeon` console script.

Interrupts are taken in hand before anything heavy is imported: from here on, a Ctrl-C ends the process with
exit code 130 and one line, whether it lands while click, rich or torch import, during the command, or
after it (see interrupts). Only the package's own __init__ runs before this module.
"""

from lorasurgeon import interrupts


def run() -> None:
    """The console entry point."""
    interrupts.exit_at_once()
    from lorasurgeon.cli import main  # the CLI and everything it imports, after the handlers are in place

    main()


if __name__ == "__main__":
    run()
