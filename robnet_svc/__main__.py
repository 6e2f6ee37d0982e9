"""`python -m robnet_svc …` (also what `torchrun -m robnet_svc …` runs)."""

from robnet_svc.cli import main

if __name__ == "__main__":
    main()
