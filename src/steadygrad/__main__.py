"""``python -m steadygrad`` (and ``torchrun -m steadygrad``) runs the command-line interface."""

from steadygrad.cli import main

if __name__ == "__main__":
    main()
