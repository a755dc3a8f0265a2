#!/usr/bin/env bash
# Let SAPIEN 3 (ManiSkill3) and SAPIEN 2.2 (SIMPLER) render on a machine without a GPU, through Mesa's
# software Vulkan driver (lavapipe). Nothing is installed system-wide: packages are unpacked into a cache
# folder and an ICD json is written beside them. No root needed. The library never runs this by itself:
#
#   make render                                  # = python -m envs.cpu_render setup, then a render check
#   python -m envs.cpu_render setup [DEST]       # DEST: $WORLDMODEL_CPU_RENDER_DIR or ~/.cache/worldmodel/cpu-render
#   bash tools/cpu_render/setup_cpu_render.sh [DEST]
#
# Afterwards `envs.cpu_render.ensure_cpu_rendering()` (called by the simulator backends) finds DEST by
# itself; in a shell, `source DEST/env.sh` does the same for other programs.
# Debian 12: Mesa 25 comes from bookworm-backports, because bookworm's own lavapipe (Mesa 22) lacks
# features SAPIEN needs (ErrorFeatureNotPresent). Other apt systems: the distribution's own
# mesa-vulkan-drivers (Mesa >= 23 works). Libraries the driver needs that the system lacks are
# unpacked too. SAPIEN 3 ships its own Vulkan loader, so only VK_ICD_FILENAMES matters (no layer).
# SAPIEN 2.2 (SIMPLER) always enables VK_KHR_external_semaphore_fd, which lavapipe lacks: the script also
# compiles vk_layer_fake_semfd.c from this folder (gcc; Vulkan headers from libvulkan-dev, unpacked here when absent)
# into DEST/layer with its manifest; env.sh enables it (VK_LAYER_PATH, VK_INSTANCE_LAYERS) and
# `ensure_cpu_rendering(sapien2=True)` does the same in Python. Without gcc only the layer is skipped.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${1:-${WORLDMODEL_CPU_RENDER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/worldmodel/cpu-render}}
die() { echo "setup_cpu_render.sh: $*" >&2; exit 1; }
command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs an apt system (Debian/Ubuntu). Elsewhere \
install Mesa >= 23's lavapipe (package mesa-vulkan-drivers or mesa-vulkan-swrast) and export VK_ICD_FILENAMES=<its lvp_icd json>."
mkdir -p "$dest"/apt/lists/partial "$dest"/apt/cache/archives/partial "$dest"/apt/sp "$dest"/debs "$dest"/mesa
dest=$(cd "$dest" && pwd)
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")

apt_o=(-o Dir::Cache="$dest/apt/cache" -o Debug::NoLocking=1)
if [ "$codename" = bookworm ]; then
  # The mirror comes from this machine's own Debian source list (deb822 or one-line format).
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "no Debian mirror found in /etc/apt sources"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$uri" /usr/share/keyrings/debian-archive-keyring.gpg >"$dest/apt/sp/worldmodel.sources"
  apt_o+=(-o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts="$dest/apt/sp" -o Dir::State::Lists="$dest/apt/lists")
  main=(mesa-vulkan-drivers/bookworm-backports libdrm2/bookworm-backports libdrm-amdgpu1/bookworm-backports)
else
  # Same sources as the system, private package lists (so no root is needed).
  apt_o+=(-o Dir::State::Lists="$dest/apt/lists")
  main=(mesa-vulkan-drivers)
fi
echo "setup_cpu_render.sh: fetching package lists (${codename:-unknown release})"
apt-get "${apt_o[@]}" update -qq 2>&1 | grep -v 'unsandboxed' || true

# Dependencies of the driver that are not installed here (resolved with the same private lists).
names=("${main[@]%%/*}")
deps=$(apt-cache "${apt_o[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
       --no-replaces --no-enhances "${names[@]}" | grep -v '^[ <]' | sort -u)
extra=()
for p in $deps; do
  case " ${names[*]} " in *" $p "*) continue;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || extra+=("$p")
done
rm -f "$dest"/debs/*.deb
echo "setup_cpu_render.sh: downloading ${main[*]} ${extra[*]}"
(cd "$dest/debs" && apt-get "${apt_o[@]}" download "${main[@]}" "${extra[@]}" 2>&1 | grep -v 'unsandboxed')
for f in "$dest"/debs/*.deb; do dpkg -x "$f" "$dest/mesa"; done

lib=$(ls "$dest"/mesa/usr/lib/*/libvulkan_lvp.so 2>/dev/null | head -1)
[ -n "$lib" ] || die "libvulkan_lvp.so missing after unpacking mesa-vulkan-drivers"
libdir=$(dirname "$lib")
missing=$(LD_LIBRARY_PATH="$libdir" ldd "$lib" | awk '/not found/{print $1}')
[ -z "$missing" ] || die "the driver still lacks: $missing (install the packages providing them)"
printf '{"file_format_version": "1.0.0", "ICD": {"api_version": "1.3.0", "library_path": "%s"}}\n' "$lib" \
  >"$dest/lvp_icd.json"
# The Vulkan layer for SAPIEN 2.2 (see the top). Headers: the system's, else libvulkan-dev unpacked here.
layer_ok=0
if command -v gcc >/dev/null; then
  inc=()
  if [ ! -f /usr/include/vulkan/vk_layer.h ]; then
    if [ ! -f "$dest/vkdev/usr/include/vulkan/vk_layer.h" ]; then
      echo "setup_cpu_render.sh: no /usr/include/vulkan/vk_layer.h; unpacking libvulkan-dev into $dest/vkdev"
      mkdir -p "$dest/vkdev/debs" && rm -f "$dest"/vkdev/debs/*.deb
      (cd "$dest/vkdev/debs" && apt-get "${apt_o[@]}" download libvulkan-dev 2>&1 | grep -v 'unsandboxed') || true
      for f in "$dest"/vkdev/debs/*.deb; do [ -f "$f" ] && dpkg -x "$f" "$dest/vkdev"; done
    fi
    inc=(-I "$dest/vkdev/usr/include")
  fi
  mkdir -p "$dest/layer"
  if gcc -shared -fPIC -O2 -fvisibility=hidden "${inc[@]}" -o "$dest/layer/libVkLayer_fake_semfd.so.tmp" \
       "$here/vk_layer_fake_semfd.c" -lpthread; then
    mv -f "$dest/layer/libVkLayer_fake_semfd.so.tmp" "$dest/layer/libVkLayer_fake_semfd.so"
    printf '%s\n' '{"file_format_version": "1.1.0", "layer": {"name": "VK_LAYER_fake_semfd", "type": "GLOBAL",' \
      " \"library_path\": \"$dest/layer/libVkLayer_fake_semfd.so\", \"api_version\": \"1.3.0\"," \
      ' "implementation_version": "1", "description": "SAPIEN 2.2 on lavapipe: fake VK_KHR_external_semaphore_fd",' \
      ' "device_extensions": [{"name": "VK_KHR_external_semaphore_fd", "spec_version": "1",' \
      '   "entrypoints": ["vkGetSemaphoreFdKHR", "vkImportSemaphoreFdKHR"]}]}}' >"$dest/layer/VkLayer_fake_semfd.json"
    layer_ok=1
  else
    echo "setup_cpu_render.sh: WARNING: could not compile the Vulkan layer (install libvulkan-dev); ManiSkill3 \
renders without it, SIMPLER (SAPIEN 2.2) will not" >&2
  fi
else
  echo "setup_cpu_render.sh: WARNING: no gcc, Vulkan layer for SIMPLER (SAPIEN 2.2) not built; ManiSkill3 is fine" >&2
fi
[ "$layer_ok" = 1 ] || rm -f "$dest/layer/VkLayer_fake_semfd.json"

{
  printf 'export VK_ICD_FILENAMES=%s\nexport LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' \
    "$dest/lvp_icd.json" "$libdir"
  if [ "$layer_ok" = 1 ]; then
    printf 'export VK_LAYER_PATH=%s${VK_LAYER_PATH:+:$VK_LAYER_PATH}\n' "$dest/layer"
    printf 'case ":${VK_INSTANCE_LAYERS:-}:" in *:VK_LAYER_fake_semfd:*) ;; '
    printf '*) export VK_INSTANCE_LAYERS=VK_LAYER_fake_semfd${VK_INSTANCE_LAYERS:+:$VK_INSTANCE_LAYERS};; esac\n'
  fi
} >"$dest/env.sh"
echo "ready: $dest/lvp_icd.json (python: envs.cpu_render.ensure_cpu_rendering(); shell: source $dest/env.sh)"
