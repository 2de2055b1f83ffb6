"""python -m tools.sidebyside [--out DIR]: write the side-by-side site (default runs/site)."""
import argparse
import sys
import time
from pathlib import Path

from tools.sidebyside import build_site


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.sidebyside",
                                     description="Write the twins side by side as a static site.")
    parser.add_argument("--out", default="runs/site", help="the site's folder (default runs/site)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        rows = build_site(args.out)
    except OSError as exc:
        print(f"error: cannot write the site to {args.out} ({exc.strerror}); choose another --out",
              file=sys.stderr)
        sys.exit(2)
    gaps = sum(len(kinds) < 3 for page in rows.values() for kinds in page.values())
    index = (Path(args.out) / "index.html").resolve()
    print(f"{len(rows)} pages, {sum(map(len, rows.values()))} rows ({gaps} with a gap) in "
          f"{time.perf_counter() - started:.1f} s; open {index.as_uri()}")


if __name__ == "__main__":
    main()
