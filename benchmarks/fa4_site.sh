# Sourced on a device machine after benchmarks/device_site.sh: installs the FlashAttention-4 pack that
# benchmarks/fa4_pack.sh made (carried over two calls, see there) into $TMPDIR/sf-site-fa4, once per machine, and puts
# it on PYTHONPATH. The small wheels go first; the CUDA-13 runtime is unpacked over them (it adds files to the same
# package folder, which pip --target would replace).
fa4_site="${TMPDIR:-/tmp}/sf-site-fa4"
if [ ! -d "$fa4_site" ]; then
  fa4_parts=(.fa4/big/cu13.tar.xz.part-*)
  if [ "${#fa4_parts[@]}" -lt 2 ] || ! compgen -G ".fa4/small/*.whl" > /dev/null; then
    echo "fa4_site.sh: .fa4/small and both .fa4/big parts must be here (carry them over two calls)" >&2
    return 1 2>/dev/null || exit 1
  fi
  rm -rf "$fa4_site.tmp"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$fa4_site.tmp" .fa4/small/*.whl \
    && cat "${fa4_parts[@]}" | xz -d | tar -C "$fa4_site.tmp" -xf - \
    && mv "$fa4_site.tmp" "$fa4_site" || { echo "fa4_site.sh: install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
# The runtime's .pth file (which adds its dsl_packages folder) is only read in site-packages, not on PYTHONPATH.
export PYTHONPATH="$fa4_site:$fa4_site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}"
