#!/bin/sh
# Builds uc's demo image: a root filesystem of Debian's busybox-static (about
# 2 MB) whose default command serves HTTP on port 80 (/ is a page, /cgi-bin/hello
# answers with the container's host name). Writes OUT (default
# /var/lib/uc/demo-image.tar), a tarball `uc image import` takes.
set -eu
out="${1:-/var/lib/uc/demo-image.tar}"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/uc-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! ls /var/cache/apt/archives/busybox-static_*.deb >/dev/null 2>&1; then
    # apt-get download runs as _apt when it can; a private dir keeps it simple.
    apt-get download busybox-static >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get download busybox-static >/dev/null
    }
    deb=$(ls "$work"/busybox-static_*.deb)
else
    deb=$(ls /var/cache/apt/archives/busybox-static_*.deb | head -n1)
fi
mkdir x && dpkg -x "$deb" x
r=rootfs
mkdir -p $r/usr/bin $r/usr/lib $r/etc $r/tmp $r/proc $r/sys $r/dev $r/run $r/root $r/var/www/cgi-bin
cp x/bin/busybox $r/usr/bin/busybox
for a in $(x/bin/busybox --list); do
    [ "$a" = busybox ] || ln -sf busybox "$r/usr/bin/$a"
done
ln -s usr/bin $r/bin
ln -s usr/bin $r/sbin
printf 'ID=uc-demo\nNAME="uc demo (busybox)"\nPRETTY_NAME="uc demo image (busybox-static)"\n' > $r/usr/lib/os-release
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > $r/etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\n' > $r/etc/group
printf '<!doctype html><title>uc demo</title><h1>Hello from uc</h1>\n' > $r/var/www/index.html
cat > $r/var/www/cgi-bin/hello <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "hello from $(hostname)"
EOF
chmod 755 $r/var/www/cgi-bin/hello
# The image's name and default command, as uc's own export format carries them.
printf '{"name":"demo","digest":"","size_bytes":0,"created_ms":0,"cmd":["httpd","-f","-v","-p","80","-h","/var/www"],"env":["PATH=/usr/bin:/bin"],"workdir":""}' > $r/.uc-image.json
mkdir -p "$(dirname "$out")"
tar -C $r --numeric-owner --owner=0 --group=0 -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "$out"
