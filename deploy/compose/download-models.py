"""Fetch demucs' released weights into MODEL_REPO, in the layout demucs' LocalRepo reads, for an offline separator.

Run by the one-shot `models` service of compose.yaml (the separator's image,
which has demucs): one `<signature>-<checksum>.th` file per model of each bag
in MODELS, checked against its checksum, and the bag's `<name>.yaml`. Files
already there are kept, so a second run downloads nothing.
"""

import hashlib
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import yaml
from demucs.pretrained import REMOTE_ROOT, _parse_remote_files


def main() -> int:
    repo = Path(os.environ["MODEL_REPO"])
    names = [name.strip() for name in os.environ.get("MODELS", "htdemucs").split(",") if name.strip()]
    urls = _parse_remote_files(REMOTE_ROOT / "files.txt")
    for name in names:
        bag = REMOTE_ROOT / f"{name}.yaml"
        if not bag.is_file():
            print(f"demucs releases no model {name!r}", file=sys.stderr)
            return 1
        for signature in yaml.safe_load(bag.read_text())["models"]:
            url = urls[signature]
            target = repo / url.rsplit("/", 1)[1]
            if not target.exists():
                print(f"{name}: downloading {url}", flush=True)
                partial = target.with_suffix(".part")
                urllib.request.urlretrieve(url, partial)
                checksum = target.stem.split("-", 1)[1]
                if not hashlib.sha256(partial.read_bytes()).hexdigest().startswith(checksum):
                    partial.unlink()
                    print(f"{url}: checksum mismatch", file=sys.stderr)
                    return 1
                partial.rename(target)
        shutil.copyfile(bag, repo / bag.name)
        print(f"{name}: ready in {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
