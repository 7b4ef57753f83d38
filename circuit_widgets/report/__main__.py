import sys

from circuit_widgets.report.cli import main

sys.exit(main())
