"""graft vs TRL GRPOTrainer, one GRPO step side by side (see graft/bench.py). Needs: pip install -e '.[bench]'

python benchmarks/grpo_step.py                      # the full comparison (~10 min on 2 CPU cores)
python benchmarks/grpo_step.py --frameworks graft   # graft alone
"""

import sys

from graft.bench import main

if __name__ == "__main__":
    sys.exit(main())
