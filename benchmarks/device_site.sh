# Sourced by the device scripts: the carried wheels (.whl/: cp312 builds of what the device image lacks, see
# benchmarks/plans/README.md) installed once per machine into $TMPDIR/sf-site, which goes on PYTHONPATH.
site="${TMPDIR:-/tmp}/sf-site"
if compgen -G ".whl/*.whl" > /dev/null && [ ! -d "$site" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
if [ -d "$site" ]; then export PYTHONPATH="$site:${PYTHONPATH:-}"; fi
