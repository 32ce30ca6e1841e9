"""``python -m covshift.cli``."""

from covshift.cli import main

main()
