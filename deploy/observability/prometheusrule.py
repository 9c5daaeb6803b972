"""Write the Prometheus Operator's PrometheusRule objects from the rule files.

The rule files (prometheus/*.rules.yml) are the source: promtool checks and
tests them, and a plain Prometheus loads them as they are. The Prometheus
Operator wants the same groups inside PrometheusRule objects; this wraps each
file's groups, comments included, into one, in the monitoring component:

    python deploy/observability/prometheusrule.py           # rewrite it
    python deploy/observability/prometheusrule.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULE_FILES = sorted((HERE / "prometheus").glob("*.rules.yml"))
TARGET = HERE.parent / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"


def wrap(rule_file: Path) -> str:
    """One PrometheusRule whose spec is the rule file from its `groups:` line on."""
    lines = rule_file.read_text().splitlines()
    start = lines.index("groups:")
    name = "stemflow-" + rule_file.name.removesuffix(".rules.yml")
    source = rule_file.relative_to(HERE.parent.parent)
    header = [
        f"# Written from {source} by deploy/observability/prometheusrule.py:",
        "# edit the rule file, then run the script.",
        "apiVersion: monitoring.coreos.com/v1",
        "kind: PrometheusRule",
        "metadata:",
        f"  name: {name}",
        "spec:",
    ]
    body = [f"  {line}" if line.strip() else "" for line in lines[start:]]
    return "\n".join(header + body) + "\n"


def render() -> str:
    return "---\n".join(wrap(path) for path in RULE_FILES)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the file is up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run python {Path(__file__).relative_to(Path.cwd())}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
