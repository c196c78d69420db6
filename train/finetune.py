"""Fine-tune with LoRA from a YAML run config: the same as the `jlora-train` console script.

python train/finetune.py --config configs/tiny-cpu.yaml --set train.steps=50
"""

import sys

from jlora.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
