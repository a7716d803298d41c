"""Build every image of the container tier ahead of its checks, then stop the engine.

``make container-images`` (root). `.ci/run` starts it in the background, at the lowest CPU and
I/O priority, while ``make test`` runs: the builds (most of the tier's cold time) overlap the
other tiers, and ``make test-containers`` afterwards finds every layer in the engine's cached
data root. Its checks do not depend on this: without it they build the images themselves.
Timings go to ``$HPSWEEP_CI_CACHE/timings.json`` (``prebuild``).
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dockerenv import (  # noqa: E402  (the module lives beside this script)
    CACHE,
    TIMINGS,
    Engine,
    build_cuda_image,
    build_images,
    compose_binary,
    log,
    write_timings,
)


def main() -> int:
    # `.ci/run` stops a build it no longer needs with SIGTERM: the engine is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="hpsw-", dir="/tmp"))  # short: socket paths
    engine = Engine(tmp)
    if engine.data_root != CACHE / "docker":
        log("the cached data root is in use: nothing to build ahead")
        return 0
    t0 = time.monotonic()
    engine.start(compose_binary())
    try:
        images = build_images(engine)
        try:
            build_cuda_image(images)
            TIMINGS["images"] = images.builds.summary()
        finally:
            images.close()
    finally:
        engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    TIMINGS["prebuild_s"] = round(time.monotonic() - t0, 1)
    write_timings("prebuild", TIMINGS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
