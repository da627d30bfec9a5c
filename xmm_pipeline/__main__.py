import sys

from xmm_pipeline.cli import main

sys.exit(main())
