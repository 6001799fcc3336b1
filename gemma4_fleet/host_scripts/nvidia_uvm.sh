#!/bin/sh
# Make sure /dev/nvidia-uvm exists before any CUDA service starts (gemma4-fleet).
#
# Without it (nvidia_uvm not loaded yet after a boot) llama-server logs "ggml_cuda_init: failed
# to initialize CUDA", keeps /health at 200 and serves on the CPU; under NoNewPrivileges and
# ProtectKernelModules it cannot load the module itself. Run as root by a oneshot unit that every
# GPU unit Requires= and is ordered After=.
#   - nvidia-modprobe -u -c=0 where it exists (loads nvidia_uvm, creates the nodes);
#   - else, with the module loaded, the nodes are made with mknod from its major in /proc/devices;
#   - no NVIDIA driver at all (a CPU host): nothing to do, success.
# G4F_PROC_DEVICES and G4F_DEV exist for the unit tests.
set -eu
devices=${G4F_PROC_DEVICES:-/proc/devices}
dev=${G4F_DEV:-/dev}

major() { awk -v name="$1" '$2 == name { print $1; exit }' "$devices"; }

if [ -z "$(major nvidiactl)" ] && [ -z "$(major nvidia)" ]; then
    echo "nvidia-uvm: no NVIDIA driver loaded ($devices has no nvidia): nothing to do"
    exit 0
fi
if command -v nvidia-modprobe >/dev/null 2>&1; then
    nvidia-modprobe -u -c=0
    echo "nvidia-uvm: nvidia-modprobe -u -c=0 done"
fi
if [ -c "$dev/nvidia-uvm" ]; then
    echo "nvidia-uvm: $dev/nvidia-uvm present"
    exit 0
fi
uvm=$(major nvidia-uvm)
if [ -z "$uvm" ]; then
    echo "nvidia-uvm: the nvidia_uvm module is not loaded and nvidia-modprobe is missing:" \
        "CUDA would fall back to the CPU (load it: modprobe nvidia_uvm)" >&2
    exit 1
fi
mknod -m 666 "$dev/nvidia-uvm" c "$uvm" 0
[ -e "$dev/nvidia-uvm-tools" ] || mknod -m 666 "$dev/nvidia-uvm-tools" c "$uvm" 1
echo "nvidia-uvm: created $dev/nvidia-uvm (major $uvm) with mknod"
