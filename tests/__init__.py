"""The test suite, laid out like slimgpt_core (tests/methods, tests/workspace, ...) plus tests/cli for the command
line and tests/studio for the studio (AppTest) and tests/studio/browser for a real browser. Every folder is a
package, so pytest imports each file as `tests.<folder>.<file>` with the repository root on sys.path (its default
"prepend" import mode) and shared helpers are imported the same way (`from tests.tiny_models import tiny_model`)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root: studio scripts run from here
