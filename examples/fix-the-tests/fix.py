"""The on_gate_failure step: read why the gate failed, then repair calc.py.

hivebus hands the previous iteration's failure (failed gates and items, with the tails
of their output) to this step as JSON in the file named by $HIVEBUS_FAILURE_CONTEXT.
"""

import json
import os
from pathlib import Path

context = json.loads(Path(os.environ["HIVEBUS_FAILURE_CONTEXT"]).read_text())
failed = [gate["name"] for gate in context["failed_gates"]]
print(f"iteration {context['iteration']} failed gates: {failed}")

source = Path("calc.py").read_text()
if "return a - b" in source:
    Path("calc.py").write_text(source.replace("return a - b", "return a + b"))
    print("fixed calc.add")
handoff = os.environ.get("HIVEBUS_HANDOFF")
if handoff:
    Path(handoff).write_text("calc.add used '-' instead of '+'; replaced it.")
