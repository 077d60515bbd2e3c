//go:build tools

// Package tools pins csi-sanity, run by `make sanity` against dynvol's node plugin socket.
package tools

import _ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
