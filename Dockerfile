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
# Stages: `runtime` (Debian packages), `build` (a virtualenv made with pinned pip, setuptools
# and wheel), and the final image: `runtime` plus the virtualenv, with no pip, compiler,
# package lists or docs.
ARG BASE=debian:bookworm-slim

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
 && apt-get install -y --no-install-recommends \
      python3 ca-certificates fuse3 s3fs rclone nfs-common procps \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
      /var/log/apt /var/log/dpkg.log /var/log/alternatives.log

FROM runtime AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
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
    /opt/dynvol/bin/pip install -q --no-compile -c constraints.txt -r requirements.txt
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

FROM runtime
COPY --from=build /opt/dynvol /opt/dynvol
ENV PATH=/opt/dynvol/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["/opt/dynvol/bin/dynvol"]
