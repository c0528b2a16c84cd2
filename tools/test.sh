#!/bin/sh
# Install everything the tests need, then run the whole test suite.
#   - Debian packages from tools/apt-packages.txt, installed only when missing
#     (service auto-start is suppressed: no peer daemon may grab port 67/69);
#   - the package itself with its test extras (pip);
#   - pytest over tests/ (its exit code is ours; "no tests collected" (5) fails).
set -eu
cd "$(dirname "$0")/.."

missing=""
for pkg in $(grep -v '^\s*#' tools/apt-packages.txt | sort -u); do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    created_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    [ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
exec python3 -m pytest "$@"
