"""``python -m quantune ...`` (what ``--gpus N`` hands to torchrun): the same CLI as ``quantune``."""
from cli import main

if __name__ == "__main__":
    main()
