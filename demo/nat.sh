#!/usr/bin/env bash
# burrow demo: two devices behind a NAT router whose firewall drops every
# inbound connection, a pivot, and an operator who reaches both by id.
#
#   sudo demo/nat.sh                      # uses ./target/release/burrow, or BURROW=/path/to/burrow
#
# Needs root, iproute2 (ip netns), nftables, openssh-server and -client.
# Everything it makes (namespaces, links, processes, files) is removed on exit.
set -euo pipefail

# The fresh build first, then one on PATH.
if [ -z "${BURROW:-}" ]; then
    if [ -x ./target/release/burrow ]; then BURROW=./target/release/burrow; else BURROW=$(command -v burrow || true); fi
fi
[ -n "$BURROW" ] || { echo "no burrow binary: build it, or set BURROW=/path/to/burrow" >&2; exit 1; }
BURROW=$(realpath "$BURROW")
SSHD=${SSHD:-/usr/sbin/sshd}
[ "$(id -u)" = 0 ] || { echo "run as root: network namespaces need it" >&2; exit 1; }
for tool in ip nft ssh ssh-keygen scp "$SSHD" "$BURROW"; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

tag=$$                        # unique names, so a demo never meets another
ROUTER=bw-router-$tag
DEVS=(cam-1 cam-2)            # cam-1 always on, cam-2 on demand
NS=(bw-cam1-$tag bw-cam2-$tag)
WORK=$(mktemp -d /tmp/burrow-demo.XXXXXX)
PIDS=()

say() { printf '\n==> %s\n' "$*"; }
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    for ns in "${NS[@]}" "$ROUTER"; do ip netns del "$ns" 2>/dev/null; done
    ip link del "bw${tag}w0" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
# Waits up to $1 seconds for the command that follows to succeed.
wait_for() {
    local limit=$1; shift
    for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timed out waiting for: $*" >&2; return 1
}
ms() { date +%s%3N; }

say "Network: the internet (10.77.0.0/24: pivot and operator), a NAT router, and two device LANs behind it"
ip netns add "$ROUTER"
ip link add "bw${tag}w0" type veth peer name "bw${tag}w1"
ip link set "bw${tag}w1" netns "$ROUTER"
ip addr add 10.77.0.1/24 dev "bw${tag}w0"; ip link set "bw${tag}w0" up
ip -n "$ROUTER" addr add 10.77.0.2/24 dev "bw${tag}w1"; ip -n "$ROUTER" link set "bw${tag}w1" up
ip -n "$ROUTER" link set lo up
ip netns exec "$ROUTER" sysctl -qw net.ipv4.ip_forward=1
for i in 0 1; do
    ns=${NS[$i]}; lan=192.168.$((50 + i))
    ip netns add "$ns"
    ip link add "bw${tag}l$i" type veth peer name "bw${tag}d$i"
    ip link set "bw${tag}l$i" netns "$ROUTER"; ip link set "bw${tag}d$i" netns "$ns"
    ip -n "$ROUTER" addr add "$lan.1/24" dev "bw${tag}l$i"; ip -n "$ROUTER" link set "bw${tag}l$i" up
    ip -n "$ns" addr add "$lan.2/24" dev "bw${tag}d$i"; ip -n "$ns" link set "bw${tag}d$i" up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$lan.1"
    # The device's own firewall: nothing comes in that it did not ask for.
    ip netns exec "$ns" nft -f - <<EOF
table inet fw {
    chain input {
        type filter hook input priority 0; policy drop;
        iif lo accept
        ct state established,related accept
    }
}
EOF
done
# The router masquerades the LANs and forwards no connection inward.
ip netns exec "$ROUTER" nft -f - <<EOF
table ip nat {
    chain post {
        type nat hook postrouting priority 100;
        oif "bw${tag}w1" masquerade
    }
}
table inet fw {
    chain inbound {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iif "bw${tag}w1" drop
        accept
    }
}
EOF

say "Each device runs its own sshd on 127.0.0.1:22, unreachable from outside"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/operator"
for i in 0 1; do
    d=$WORK/${DEVS[$i]}; mkdir -p "$d"
    ssh-keygen -q -t ed25519 -N '' -f "$d/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$d/device_key"
    cp "$WORK/operator.pub" "$d/authorized_keys"
    cat > "$d/sshd_config" <<EOF
Port 22
ListenAddress 127.0.0.1
HostKey $d/host_key
AuthorizedKeysFile $d/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PidFile none
Subsystem sftp internal-sftp
EOF
    mkdir -p /run/sshd
    ip netns exec "${NS[$i]}" "$SSHD" -D -f "$d/sshd_config" -E "$d/sshd.log" & PIDS+=($!)
done
# Even from its own LAN (the router), a connection to cam-1 gets no answer:
# its firewall drops it. From the internet there is no route in at all.
# (Dropped, the attempt times out: exit 124. Refused or answered would not.)
rc=0; ip netns exec "$ROUTER" timeout 2 bash -c '</dev/tcp/192.168.50.2/22' 2>/dev/null || rc=$?
if [ "$rc" != 124 ]; then
    echo "cam-1 answered a direct connection (exit $rc): the firewall is not in place" >&2; exit 1
fi
echo "a direct connection to cam-1 (192.168.50.2:22) fails, even from its LAN: its firewall drops it"

say "The pivot starts on 10.77.0.1 (embedded registry, MQTT broker and host key)"
DATA=$WORK/pivot
"$BURROW" server --data-dir "$DATA" --listen 10.77.0.1:2222 --mqtt-listen 10.77.0.1:8883 \
    --advertise 10.77.0.1:2222 --idle-timeout 5s >"$WORK/pivot.log" 2>&1 & PIDS+=($!)
wait_for 20 grep -q "mqtt (embedded broker) listening" "$WORK/pivot.log"
PIN=$(sed -n 's/^host key \(SHA256:[^ ]*\).*/\1/p' "$WORK/pivot.log")
MQTT_PIN=$(sed -n 's/^mqtt certificate \(SHA256:[^ ]*\).*/\1/p' "$WORK/pivot.log")
echo "pivot host key $PIN"

say "Register the operator and both devices (with their sshd host keys, for strict checking)"
"$BURROW" operator add alice --admin --key "$WORK/operator.pub" --data-dir "$DATA"
for dev in "${DEVS[@]}"; do
    "$BURROW" device add "$dev" --key "$WORK/$dev/device_key.pub" --host-key "$WORK/$dev/host_key.pub" \
        --label site=demo --data-dir "$DATA"
done

say "cam-1 runs an always-on agent: it dials out through the NAT and holds its tunnel"
ip netns exec "${NS[0]}" "$BURROW" agent --pivot 10.77.0.1:2222 --id cam-1 --key "$WORK/cam-1/device_key" \
    --pivot-host-key "$PIN" --expose 22=127.0.0.1:22 --status-file "$WORK/cam-1/status.json" \
    >"$WORK/cam-1/agent.log" 2>&1 & PIDS+=($!)
say "cam-2 runs an on-demand agent: one MQTT connection, no tunnel until someone asks"
ip netns exec "${NS[1]}" "$BURROW" agent --mqtt-url mqtts://10.77.0.1:8883 --mqtt-fingerprint "$MQTT_PIN" \
    --id cam-2 --key "$WORK/cam-2/device_key" --pivot-host-key "$PIN" --expose 22=127.0.0.1:22 \
    --status-file "$WORK/cam-2/status.json" >"$WORK/cam-2/agent.log" 2>&1 & PIDS+=($!)
wait_for 20 sh -c "'$BURROW' device show cam-1 --data-dir '$DATA' | grep -q 'status: *connected'"
wait_for 20 sh -c "'$BURROW' device show cam-2 --data-dir '$DATA' | grep -q 'status: *waiting'"
"$BURROW" device list --data-dir "$DATA"

say "The operator logs in once; ssh, scp and sftp then take device ids"
export HOME=$WORK/home; mkdir -p "$HOME/.ssh"
"$BURROW" login 10.77.0.1:2222 --pivot-host-key "$PIN" --identity "$WORK/operator"
# (ssh reads the home of the passwd entry, not $HOME: name the config.)
SSH=(ssh -F "$HOME/.ssh/config" -o BatchMode=yes)
echo "\$ ssh root@cam-1.burrow uname -n"
"${SSH[@]}" root@cam-1.burrow uname -n
head -c 1048576 /dev/urandom >"$WORK/firmware.bin"
echo "\$ scp firmware.bin root@cam-1.burrow:/tmp/"
scp -q -F "$HOME/.ssh/config" -o BatchMode=yes "$WORK/firmware.bin" root@cam-1.burrow:"$WORK/cam-1/firmware.bin"
cmp "$WORK/firmware.bin" "$WORK/cam-1/firmware.bin" && echo "copied 1 MiB through the pivot, identical"

say "cam-2 is asleep: the first ssh wakes it over MQTT and waits for its tunnel"
start=$(ms)
"${SSH[@]}" root@cam-2.burrow true
echo "ssh to a sleeping device took $(( $(ms) - start )) ms, wake-up included"
start=$(ms)
"${SSH[@]}" root@cam-2.burrow true
echo "the next ssh, with the tunnel up, took $(( $(ms) - start )) ms"

say "cam-2's agent stops; the pivot says why it cannot be reached"
kill "${PIDS[-1]}"
wait_for 20 sh -c "'$BURROW' device show cam-2 --data-dir '$DATA' | grep -q 'status: *offline'"
if "${SSH[@]}" root@cam-2.burrow true 2>"$WORK/offline.txt"; then echo "cam-2 answered while offline" >&2; exit 1; fi
grep -o "device 'cam-2' is offline[^\r]*" "$WORK/offline.txt" | head -1

say "The audit trail: who reached what, from where (devices appear as the NAT's 10.77.0.2)"
"$BURROW" audit --data-dir "$DATA" --since 10m --limit 12

say "Done; cleaning up"
