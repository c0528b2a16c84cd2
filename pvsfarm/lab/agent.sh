#!/bin/busybox sh
# pvsfarm OS-stage agent: /init of the e2e initramfs (busybox-static + nbd-client).
#
# After iPXE `sanboot`ed the vDisk and SYSLINUX started this kernel, the firmware's
# session is gone: the OS logs in again and attaches its vDisk over NBD.
#   1. DHCP (udhcpc) on the first NIC; the reservation gives the same address.
#   2. Login: GET <url>/boot.json?mac=<mac> on each URL of pvsfarm.login= (comma
#      separated; from syslinux APPEND) until one answers; the answer names the
#      assigned server, its NBD endpoint, the export token and the live farm.
#      With the `kernel` boot method iPXE already logged in and passes
#      pvsfarm.nbd=host:port pvsfarm.export=TOKEN pvsfarm.server=NAME instead.
#   3. nbd-client HOST PORT /dev/nbdN -N TOKEN; mount partition 1 (FAT) read-only,
#      sha256 the marker file, print it with the serving node's name; repeat every
#      pvsfarm.interval_s seconds with the page cache dropped, so every round is
#      read over the network.
#   4. A failed read means the serving node is gone: detach, log in again with
#      resume=<token>&exclude=<dead server> after a jittered exponential back-off,
#      attach the next /dev/nbdN to the server named in the answer, read again.
# Serial lines the tests match start with "pvsfarm-agent: ".
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /run /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Kernel messages only from KERN_ALERT up on the console: nbd's "Dead connection" errors
# printed mid-line would garble the lines the tests read (a panic still shows).
echo 1 >/proc/sys/kernel/printk

say() { echo "pvsfarm-agent: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
nap_ms() { sleep "$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)))"; }

LOGIN="" MARKER=MARKER.BIN INTERVAL_S=1 HTTP_PORT=8080 EXPORT="" SERVER="" NBD_HOST="" NBD_PORT=""
for arg in $(cat /proc/cmdline); do
    case $arg in
        pvsfarm.login=*) LOGIN=$(echo "${arg#*=}" | tr ',' ' ') ;;
        pvsfarm.marker=*) MARKER=${arg#*=} ;;
        pvsfarm.interval_s=*) INTERVAL_S=${arg#*=} ;;
        pvsfarm.export=*) EXPORT=${arg#*=} ;;
        pvsfarm.server=*) SERVER=${arg#*=} ;;
        pvsfarm.nbd=*) NBD_HOST=${arg#*=}; NBD_PORT=${NBD_HOST##*:}; NBD_HOST=${NBD_HOST%:*} ;;
    esac
done
say "started (kernel $(uname -r), uptime $(uptime_s) s)"

# -- network -----------------------------------------------------------------
for m in virtio_pci virtio_net e1000; do modprobe "$m" 2>/dev/null; done
IF=""
i=0
while [ -z "$IF" ] && [ $i -lt 100 ]; do
    IF=$(ls /sys/class/net | grep -v '^lo$' | head -1)
    [ -z "$IF" ] && sleep 0.1
    i=$((i + 1))
done
[ -n "$IF" ] || { say "FATAL no network interface"; exec sh; }
MAC=$(cat "/sys/class/net/$IF/address")
ip link set lo up
ip link set "$IF" up
until udhcpc -i "$IF" -n -q -t 10 -T 1 -s /etc/udhcpc.script >/tmp/udhcpc.log 2>&1; do
    say "dhcp on $IF ($MAC) failed; retrying"
    sleep 1
done
. /run/dhcp.env
say "dhcp $DHCP_IP on $IF ($MAC) from $DHCP_SERVER"
[ -n "$LOGIN" ] || LOGIN="http://${DHCP_SIADDR:-$DHCP_SERVER}:$HTTP_PORT"

modprobe nbd nbds_max=16 max_part=4 || say "modprobe nbd failed"
for m in nls_cp437 nls_ascii nls_utf8 vfat; do modprobe "$m" 2>/dev/null; done

# -- login ---------------------------------------------------------------------
field() { # the value of "key" in /tmp/login.json (flat; aiohttp's json.dumps spacing)
    sed -n "s/.*\"$1\": *\"\{0,1\}\([^\",}]*\).*/\1/p" /tmp/login.json | head -1
}

login() { # $1: extra query string. Tries the URLs in $AVOID (a dead server's) last.
    local url first="" last=""
    for url in $LOGIN; do
        case " $AVOID " in *" $url "*) last="$last $url" ;; *) first="$first $url" ;; esac
    done
    for url in $first $last; do
        # no wget -T: busybox-static 1.35's wget segfaults with it (Debian 12); timeout(1) bounds it
        if timeout 8 wget -q -O /tmp/login.json "$url/boot.json?mac=$MAC$1" 2>/tmp/wget.err; then
            SERVER=$(field server) NBD_HOST=$(field nbd_host) NBD_PORT=$(field nbd_port)
            EXPORT=$(field export) RESUMED=$(field resumed) VDISK=$(field vdisk)
            [ -n "$EXPORT" ] && [ -n "$NBD_HOST" ] || continue
            LOGIN_VIA=$url
            farm_urls
            return 0
        fi
    done
    return 1
}

farm_urls() { # learn the live farm from the answer, keep what we were told too
    local urls rest u
    urls=$(grep -o '"url": *"[^"]*"' /tmp/login.json | sed 's/.*"\(http[^"]*\)"/\1/')
    AVOID=""
    rest=$(grep -o '"name": *"[^"]*", *"url": *"[^"]*"' /tmp/login.json |
        sed 's/"name": *"\([^"]*\)", *"url": *"\([^"]*\)"/\1=\2/')
    FARM=$rest
    for u in $LOGIN; do
        case " $urls " in *" $u "*) ;; *) urls="$urls $u" ;; esac
    done
    LOGIN=$(echo $urls)
}

url_of() { # the login URL of server $1, from the last answer's farm list
    local pair
    for pair in $FARM; do
        [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"
    done
}

backoff() { # $1 attempt: 200 ms doubling to 3.2 s, half of it random (many targets fail over at once)
    local base=$((200 << ($1 > 4 ? 4 : $1)))
    nap_ms $((base / 2 + RANDOM % (base / 2 + 1)))
}

# -- NBD -----------------------------------------------------------------------
N=0
DEV=""
attach() {
    DEV=/dev/nbd$N
    if ! nbd-client "$NBD_HOST" "$NBD_PORT" "$DEV" -N "$EXPORT" -b 512 -t 5 >/tmp/nbd.log 2>&1; then
        say "nbd-client $NBD_HOST:$NBD_PORT $DEV failed: $(tail -1 /tmp/nbd.log)"
        return 1
    fi
    local i=0
    while [ ! -b "${DEV}p1" ] && [ $i -lt 50 ]; do
        blockdev --rereadpt "$DEV" 2>/dev/null
        sleep 0.1
        i=$((i + 1))
    done
    [ -b "${DEV}p1" ] || { say "no partition 1 on $DEV"; return 1; }
    say "attached $DEV to $NBD_HOST:$NBD_PORT ($SERVER) in $(uptime_s) s uptime"
}

detach() {
    [ -n "$DEV" ] && nbd-client -d "$DEV" >/dev/null 2>&1
    N=$(((N + 1) % 16))
}

read_marker() {
    SUM=""
    mount -t vfat -o ro "${DEV}p1" /mnt 2>/tmp/mount.err || return 1
    SUM=$(sha256sum "/mnt/$MARKER" 2>/dev/null | cut -d' ' -f1)
    umount /mnt 2>/dev/null || umount -l /mnt
    echo 3 >/proc/sys/vm/drop_caches
    [ ${#SUM} -eq 64 ]
}

failover() { # $1: the server that stopped answering
    local dead=$1 attempt=0 exclude=$1
    detach
    AVOID=$(url_of "$dead")
    while :; do
        backoff $attempt
        attempt=$((attempt + 1))
        if login "&resume=$EXPORT&exclude=$exclude"; then
            say "relogin via $LOGIN_VIA: $dead -> $SERVER (resumed=$RESUMED, attempt $attempt)"
            attach && return 0
            detach
            exclude="$exclude,$SERVER"
        else
            say "relogin attempt $attempt failed ($(tail -1 /tmp/wget.err 2>/dev/null))"
            [ $((attempt % 4)) -eq 0 ] && exclude=$dead  # everything excluded: start over
        fi
    done
}

if [ -z "$EXPORT" ]; then
    attempt=0
    until login ""; do
        say "login failed on: $LOGIN ($(tail -1 /tmp/wget.err 2>/dev/null))"
        backoff $attempt
        attempt=$((attempt + 1))
    done
    say "login via $LOGIN_VIA: vdisk $VDISK on $SERVER ($NBD_HOST:$NBD_PORT)"
fi
attach || failover "$SERVER"

READS=0
while :; do
    if read_marker; then
        READS=$((READS + 1))
        say "MARKER sha256=$SUM server=$SERVER read=$READS uptime=$(uptime_s)"
        sleep "$INTERVAL_S"
    else
        say "read failed on $SERVER ($DEV): $(tail -1 /tmp/mount.err 2>/dev/null)"
        failover "$SERVER"
    fi
done
