"""``python -m svdllm`` (and ``torchrun ... -m svdllm``): the command line."""
import sys

from .cli import main

sys.exit(main())
