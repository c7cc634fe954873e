"""`python -m uta_cli`, `accelerate launch -m uta_cli`, `torchrun -m uta_cli`."""

from uta_cli.app import main

if __name__ == "__main__":
    main()
