"""``python -m adaptkit.cli``: the same command line as the ``adaptkit`` console script."""

from . import main

if __name__ == "__main__":
    main()
