import sys

from safesteer.bench.runner import main

sys.exit(main())
