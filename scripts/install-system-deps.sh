#!/usr/bin/env bash
# Debian packages the apps need at run or test time (espeak-ng synthesises the speech used
# by the speech app's tests and demo; g++ builds the CPU kernels of core_attention.native on
# first use, without which those paths fall back to PyTorch ops). Installed when absent and running as root; otherwise
# a message says what to install. Never fails the install: the tests that need a missing
# tool are skipped with the same message.
set -uo pipefail

debian_packages=(espeak-ng g++)

missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "install: installing Debian packages: ${missing[*]}"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; }; then
    echo "install: WARNING: apt-get could not install ${missing[*]}; the tests that need them will be skipped"
  fi
else
  echo "install: NOTE: Debian packages ${missing[*]} are missing and this is not root;"
  echo "         install them with: sudo apt-get install ${missing[*]}"
fi
exit 0
