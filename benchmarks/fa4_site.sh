# Sourced on a device machine after benchmarks/device_site.sh, in both of the two calls that carry the
# FlashAttention-4 pack made by benchmarks/fa4_pack.sh: call 1 carries `.fa4/small` and part-aa, call 2 part-ab. A
# carried path replaces its folder's ignored files on the device, so each call first stashes what it brought in
# $TMPDIR/sf-fa4-parts (kept while the machine is warm); once the stash holds the small wheels and both parts, the
# pack is installed into $TMPDIR/sf-site-fa4, once per machine, and put on PYTHONPATH. The small wheels go first; the
# CUDA-13 runtime is unpacked over them (it adds files to the same package folder, which pip --target would replace).
fa4_site="${TMPDIR:-/tmp}/sf-site-fa4"
fa4_stash="${TMPDIR:-/tmp}/sf-fa4-parts"
mkdir -p "$fa4_stash"
cp .fa4/small/*.whl .fa4/big/cu13.tar.xz.part-* "$fa4_stash"/ 2>/dev/null || true
if [ ! -d "$fa4_site" ]; then
  fa4_parts=("$fa4_stash"/cu13.tar.xz.part-*)
  if [ "${#fa4_parts[@]}" -lt 2 ] || ! compgen -G "$fa4_stash/*.whl" > /dev/null; then
    echo "fa4_site.sh: stashed $(ls "$fa4_stash" | wc -l) files; the small wheels and both parts are needed" \
      "(carry them over two calls on one warm machine)" >&2
    return 1 2>/dev/null || exit 1
  fi
  rm -rf "$fa4_site.tmp"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$fa4_site.tmp" "$fa4_stash"/*.whl \
    && cat "${fa4_parts[@]}" | xz -d | tar -C "$fa4_site.tmp" -xf - \
    && mv "$fa4_site.tmp" "$fa4_site" || { echo "fa4_site.sh: install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
# The runtime's .pth file (which adds its dsl_packages folder) is only read in site-packages, not on PYTHONPATH.
export PYTHONPATH="$fa4_site:$fa4_site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}"
