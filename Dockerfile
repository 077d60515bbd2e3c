# syntax=docker/dockerfile:1
# dynvol's image: one image for its three processes, `dynvol node`, `dynvol controller` and
# the Dynamic Mount Pods' `dynvol dmp` (which runs s3fs, rclone and mount.nfs as children).
#
#   docker build --pull -t dynvol/dynvol:dev .            (or podman / buildah build)
#
# This is the only definition of the image: hack/images/build.py builds this file with
# buildah on a base made by debootstrap, and the end-to-end tests run the result. See
# docs/images.md.
#
# Stages: `libxml2` (Debian's libxml2 rebuilt without ICU), `runtime` (Debian packages),
# `build` (a virtualenv made with pinned pip, setuptools and wheel), `system` (`runtime`
# without what no process reads: hack/images/slim.py), and the final image: `system` as one
# layer and the virtualenv as another, with no pip, compiler, package lists or docs.
ARG BASE=debian:bookworm-slim

# s3fs parses S3's XML answers with libxml2, and Debian builds libxml2 with ICU, whose
# libicu72 (36 MB, mostly collation and locale data) nothing else in the image uses: S3
# answers in UTF-8, and libxml2 without ICU still converts other encodings through iconv.
# This stage rebuilds the libxml2 source package of the archive's current version (security
# updates included) with only `--with-icu` turned off, as a package one version above
# Debian's (`+dynvol1`): apt sees no libxml2 to upgrade until Debian publishes a newer one,
# and then `apt list --upgradable` (tests/integration/test_image.py) says so until the
# image is built again from that version. Only the library package leaves this stage.
FROM ${BASE} AS libxml2
ARG DEBIAN_FRONTEND=noninteractive
ARG DEBIAN_STATE=unknown
RUN echo "Debian package state: ${DEBIAN_STATE}" \
 && sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/debian-src.sources \
 && apt-get update \
 && apt-get upgrade -y \
 && apt-get install -y --no-install-recommends dpkg-dev \
 && mkdir /build && cd /build \
 && apt-get source -q libxml2 \
 && cd libxml2-*/ \
 && grep -q -- '--with-icu' debian/rules \
 && sed -i 's/--with-icu/--without-icu/' debian/rules \
 && sed -i '/^ libicu-dev,$/d' debian/control \
 && apt-get build-dep -y --no-install-recommends --arch-only -P nopython ./ \
 && version="$(dpkg-parsechangelog -S Version)" \
 && when="$(dpkg-parsechangelog -S Date)" \
 && { printf 'libxml2 (%s+dynvol1) %s; urgency=medium\n\n' "$version" "$(dpkg-parsechangelog -S Distribution)"; \
      printf '  * Built without ICU (--without-icu) for the dynvol image.\n\n'; \
      printf ' -- dynvol <dynvol@localhost>  %s\n\n' "$when"; \
      cat debian/changelog; } > debian/changelog.new \
 && mv debian/changelog.new debian/changelog \
 && DEB_BUILD_PROFILES=nopython DEB_BUILD_OPTIONS="parallel=$(nproc) noddebs" \
      dpkg-buildpackage -B -uc -us >/build/build.log 2>&1 || { tail -50 /build/build.log; exit 1; } \
 && mkdir /out && mv "/build/libxml2_${version}+dynvol1_$(dpkg --print-architecture).deb" /out/ \
 && dpkg-deb -f /out/libxml2_*.deb Depends | grep -qv icu

FROM ${BASE} AS runtime
# ARG, not ENV: the frontend is a build-time setting and stays out of the image's config.
ARG DEBIAN_FRONTEND=noninteractive
# build.py passes a digest of the Debian archive's package indices, so that a cached layer
# is reused only while no newer package exists.
ARG DEBIAN_STATE=unknown
# The packages beyond the base: python3 for the processes, fuse3 (fusermount3) for the FUSE
# mounters s3fs and rclone, nfs-common for mount.nfs, ca-certificates for TLS endpoints,
# procps (ps, pgrep) for operators looking at a mount pod's daemons.
# s3fs reads /etc/mime.types (media-types) through mime-support, which also depends on
# mailcap, a perl script that needs all of perl (47 MB). A local empty package providing
# `mailcap` stands in for it, so apt installs neither.
# Debian's python3 byte-compiles the standard library on install: those .pyc files stay
# (see the build stage for why).
# The libxml2 package is copied in rather than bind-mounted (buildah does not key a RUN's
# cache on what it mounts, so a changed libxml2 stage could meet a stale cached layer); it
# is deleted once installed, and the final image holds this stage's tree as it ends.
COPY --from=libxml2 /out /tmp/libxml2
RUN echo "Debian package state: ${DEBIAN_STATE}" \
 && mkdir -p /tmp/no-mailcap/DEBIAN \
 && printf '%s\n' 'Package: dynvol-no-mailcap' 'Version: 1' 'Architecture: all' \
      'Maintainer: dynvol' 'Provides: mailcap' 'Priority: optional' \
      'Description: stands in for mailcap: the image runs no MIME handlers' \
      > /tmp/no-mailcap/DEBIAN/control \
 && dpkg-deb --build /tmp/no-mailcap /tmp/no-mailcap.deb >/dev/null \
 && dpkg -i /tmp/no-mailcap.deb \
 && rm -rf /tmp/no-mailcap /tmp/no-mailcap.deb \
 && apt-get update \
 && apt-get upgrade -y \
 && apt-get install -y --no-install-recommends /tmp/libxml2/libxml2_*.deb \
      python3 ca-certificates fuse3 s3fs rclone nfs-common procps \
 && if dpkg -s libicu72 >/dev/null 2>&1; then echo "libicu72 came back" >&2; exit 1; fi \
 && rm -rf /tmp/libxml2 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
      /var/log/apt /var/log/dpkg.log /var/log/alternatives.log

FROM runtime AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# PyYAML and multidict (grpclib's) are built from their pinned sources without their C
# extensions (2.7 and 1.5 MB): they buy speed no service needs here, where PyYAML reads a
# kubeconfig at most once and multidict holds a gRPC call's few headers. Both builds are pure
# Python and use the pinned setuptools already in the virtualenv (no build isolation).
# Dependencies first, so that a change to the code rebuilds only the last layers. Every
# distribution in the virtualenv is pinned by hack/constraints.txt, pip and the build
# backend included; pinned.py fails the build on anything that is not.
# The pip configuration and CA bundle of the machine that builds (an index mirror, a proxy's
# CA) come in as build secrets, mounted for this step only and never stored in a layer.
COPY pyproject.toml hack/constraints.txt hack/images/pinned.py ./
RUN --mount=type=secret,id=pipconf --mount=type=secret,id=cacert \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    set -e; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore; \
    python3 -m venv /opt/dynvol; \
    /opt/dynvol/bin/pip install -q -c constraints.txt pip setuptools wheel; \
    python3 pinned.py requirements pyproject.toml services > requirements.txt; \
    PYYAML_FORCE_LIBYAML=0 MULTIDICT_NO_EXTENSIONS=1 /opt/dynvol/bin/pip install -q \
      --no-compile --no-build-isolation --no-binary PyYAML,multidict \
      -c constraints.txt -r requirements.txt
COPY . .
# No index for the project itself: it has no dependencies left to fetch, and it is built
# with the pinned setuptools and wheel already in the virtualenv. Then the build tools go,
# and so do type stubs (.pyi, for type checkers only).
# Byte code: everything is precompiled, with unchecked hashes (the image never changes, so
# Python need not compare sources). Without it every process start compiles what it imports
# again (with the Kubernetes client library, which the image no longer has, that was 2 s of
# CPU against 0.5 s), which a Dynamic Mount Pod limited to 10m of CPU would take minutes to
# get through.
RUN set -e; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore; \
    /opt/dynvol/bin/pip install -q --no-compile --no-index --no-deps --no-build-isolation ".[services]" ; \
    /opt/dynvol/bin/python hack/images/pinned.py check hack/constraints.txt; \
    /opt/dynvol/bin/pip uninstall -q -y pip setuptools wheel packaging; \
    /opt/dynvol/bin/python hack/images/pinned.py complete; \
    rm -f /opt/dynvol/bin/activate* /opt/dynvol/bin/Activate.ps1; \
    find /opt/dynvol \( -name __pycache__ -o -name '*.pyi' \) -prune -exec rm -rf {} +; \
    /opt/dynvol/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      /opt/dynvol/lib

# The system without what none of the image's processes reads (docs/images.md, "What the
# system leaves out"): the time zone database (the services log in UTC), and what
# hack/images/slim.py's dpkg filters leave out (most of glibc's character set converters,
# the standard library's help() data and test support, shell completions) together with the
# byte code of standard library modules no service imports. The filters stay in dpkg's
# configuration, so packages installed later, here or in an image built FROM this one,
# leave the same files out.
FROM runtime AS system
ARG DEBIAN_FRONTEND=noninteractive
# Copied rather than bind-mounted: a build cache keys a COPY on the file's content, and
# buildah does not key a RUN on what it mounts. The final stage copies the tree after the
# script is gone.
COPY hack/images/slim.py /tmp/slim.py
RUN apt-get purge -y -q tzdata \
 && python3 /tmp/slim.py apply \
 && rm -rf /tmp/slim.py /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old

# One layer for the system: files removed in a layer above the base's would still be
# carried in the base's layer. The virtualenv is a layer of its own, so that a change to
# dynvol's code changes only that layer.
FROM scratch
COPY --from=system / /
COPY --from=build /opt/dynvol /opt/dynvol
ENV PATH=/opt/dynvol/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["/opt/dynvol/bin/dynvol"]
