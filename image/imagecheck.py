"""The Dockerfile and the images scripts/build-image assembles, held to each other.

image/files names the images (arrowport, arrowport-lake, arrowport-operator) and their layers; each image
is the Dockerfile stage of the same name (`docker build --target NAME`), which may be built on other
stages of the same file, down to `FROM scratch`.

    python3 image/imagecheck.py config Dockerfile IMAGE
        umoci config arguments for the image's stage (user, working directory, environment, ports,
        entrypoint, command, labels, with what it inherits from the stages it is built on), one per line:
        scripts/build-image applies them.
    python3 image/imagecheck.py compare Dockerfile IMAGE LAYOUT:TAG ROOTFS
        checks that the Dockerfile's image and the assembled OCI image have the same files: the stages
        the image is made of must COPY exactly its layers (as image/files lists them, in that order), each
        as ROOTFS's layer directory that a build stage makes with scripts/build-image, and do nothing
        else; each layer of the image at LAYOUT:TAG must be a complete tar archive holding exactly the
        files of that directory (path, type, mode, owner, size, link target), and every layer but `base`
        exactly the paths image/files puts into it; no shell anywhere; and the image's configuration is the Dockerfile's.
    python3 image/imagecheck.py layers IMAGE
        the image's layers (image/files' `image` line), bottom first, one per line.
    python3 image/imagecheck.py paths IMAGE
        the paths image/files puts into the image, one per line.

Only the Dockerfile instructions its image stages use are understood; any other one is an error, so that
a change to the Dockerfile cannot silently make the two images differ. Python's standard library only.
"""

import gzip
import json
import os
import shlex
import stat
import sys
import tarfile

FILES = "image/files"
SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh", "busybox"}


class Mismatch(Exception):
    pass


def instructions(dockerfile):
    """(instruction, arguments) pairs, with continuation lines joined and comments dropped."""
    result, pending = [], ""
    with open(dockerfile) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            text = (pending + line).strip()
            pending = ""
            word, _, rest = text.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages(dockerfile):
    """[(name, [(instruction, arguments)])] per FROM."""
    result = []
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append((name, [(word, rest)]))
        elif result:
            result[-1][1].append((word, rest))
    return result


def key_values(text):
    """`a=b c="d e"` (LABEL, ENV) as pairs."""
    pairs = []
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if not sep:
            raise Mismatch(f"only the key=value form is understood: {text}")
        pairs.append((key, value))
    return pairs


def image_files(files=FILES):
    """({image: [layer, ...]}, [(path, layer, flags)]) from image/files: its `image NAME LAYER...` lines and
    its file lines (PATH MODE OWNER LAYER SOURCE [FLAGS])."""
    images, entries = {}, []
    with open(files) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if fields[0] == "image":
                if len(fields) < 3 or fields[2] != "base":
                    raise Mismatch(f"{files}: `{' '.join(fields)}`: an image's layers start with base")
                images[fields[1]] = fields[2:]
            elif len(fields) in (5, 6) and fields[0].startswith("/"):
                entries.append((fields[0], fields[3], fields[5].split(",") if len(fields) == 6 else []))
            else:
                raise Mismatch(f"{files}: cannot read `{line.strip()}`")
    layers = {layer for names in images.values() for layer in names}
    for path, layer, _ in entries:
        if layer == "base" or layer not in layers:
            raise Mismatch(f"{files}: {path} is in layer {layer!r}, which no image has beyond base")
    return images, entries


def image_layers(image):
    images, _ = image_files()
    if image not in images:
        raise Mismatch(f"{FILES} has no image {image!r} (it has {', '.join(images)})")
    return images[image]


def image_stage(dockerfile, image):
    """The image's configuration and its COPY lines, from its stage and the stages it is built on,
    refusing any other instruction."""
    all_stages = stages(dockerfile)
    by_name = {name: body for name, body in all_stages if name}
    if image not in by_name:
        raise Mismatch(f"{dockerfile} has no stage {image} (`docker build --target {image}`)")
    chain, name = [], image
    while True:
        chain.insert(0, (name, by_name[name]))
        base = by_name[name][0][1].split()[0]
        if base == "scratch":
            break
        if base not in by_name or any(n == base for n, _ in chain):
            raise Mismatch(f"stage {name} is built on {base}: an image's stages must be built on scratch "
                           "or on another stage of the Dockerfile")
        name = base
    config = {"Env": {}, "Labels": {}, "ExposedPorts": []}
    copies = []
    for name, body in chain:
        cmd_set = False  # as Docker: an ENTRYPOINT drops the CMD a stage inherits, not one it sets itself
        for word, rest in body[1:]:
            if word == "COPY":
                copies.append(rest.split())
            elif word == "LABEL":
                config["Labels"].update(key_values(rest))
            elif word == "ENV":
                config["Env"].update(key_values(rest))
            elif word == "USER":
                config["User"] = rest
            elif word == "WORKDIR":
                config["WorkingDir"] = rest
            elif word == "EXPOSE":
                config["ExposedPorts"] += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
            elif word in ("ENTRYPOINT", "CMD"):
                if not rest.startswith("["):
                    raise Mismatch(f"stage {name}: {word} must be in the exec (JSON) form: {rest}")
                if word == "CMD":
                    config["Cmd"], cmd_set = json.loads(rest), True
                else:
                    config["Entrypoint"] = json.loads(rest)
                    if not cmd_set:
                        config.pop("Cmd", None)
            else:
                raise Mismatch(f"stage {name}'s {word} is not understood by image/imagecheck.py: "
                               "the assembled image would not have it")
    config["Env"] = [f"{k}={v}" for k, v in config["Env"].items()]
    return all_stages, config, copies


def umoci_config_args(dockerfile, image):
    image_layers(image)
    _, config, _ = image_stage(dockerfile, image)
    args = []
    if "User" in config:
        args.append(f"--config.user={config['User']}")
    if "WorkingDir" in config:
        args.append(f"--config.workingdir={config['WorkingDir']}")
    args += [f"--config.env={e}" for e in config["Env"]]
    args += [f"--config.exposedports={p}" for p in config["ExposedPorts"]]
    args += [f"--config.entrypoint={a}" for a in config.get("Entrypoint", [])]
    args += [f"--config.cmd={a}" for a in config.get("Cmd", [])]
    args += [f"--config.label={k}={v}" for k, v in config["Labels"].items()]
    return args


def check_copies(all_stages, image, layers, copies):
    """The image's stages copy exactly ROOT/<layer>/ of each of its layers, in order, from a stage that
    runs scripts/build-image --rootfs ROOT (building this image: all of them, or it among its --image)."""
    builders = {}
    for name, body in all_stages:
        for word, rest in body:
            if word == "RUN" and "scripts/build-image" in rest:
                tokens = shlex.split(rest)
                chosen = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--image"]
                if "--rootfs" in tokens and "--layout" not in tokens and (not chosen or image in chosen):
                    builders[name] = tokens[tokens.index("--rootfs") + 1].rstrip("/")
    if len(copies) != len(layers):
        raise Mismatch(f"the stages of {image} must COPY exactly its {len(layers)} layers "
                       f"({' '.join(layers)}), found {len(copies)} COPYs")
    for layer, args in zip(layers, copies):
        options = [a for a in args if a.startswith("--")]
        paths = [a for a in args if not a.startswith("--")]
        source = next((o.split("=", 1)[1] for o in options if o.startswith("--from=")), None)
        if source not in builders:
            raise Mismatch(f"COPY {' '.join(args)}: not from a stage that runs scripts/build-image --rootfs "
                           f"for {image}")
        want = [f"{builders[source]}/{layer}/", "/"]
        if paths != want or any(not o.startswith("--from=") for o in options):
            raise Mismatch(f"{image}'s layer {layer}: COPY {' '.join(args)}: expected "
                           f"COPY --from={source} {' '.join(want)}")


def entry_of(path, st, link):
    kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
    size = st.st_size if kind == "f" else 0
    return (path, kind, f"{stat.S_IMODE(st.st_mode):04o}", st.st_uid, st.st_gid, size, link)


def tree_entries(root):
    entries = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(directory, name)
            st = os.lstat(full)
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else ""
            entries.add(entry_of("/" + os.path.relpath(full, root), st, link))
    return entries


def tar_entries(blob):
    entries = set()
    with gzip.open(blob) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for m in tar:
            path = "/" + os.path.normpath(m.name).lstrip("./")
            if path == "/" or path.endswith("/."):
                continue
            if os.path.basename(path).startswith(".wh."):
                raise Mismatch(f"layer {blob}: whiteout {path}")
            kind = "d" if m.isdir() else "l" if m.issym() else "f" if m.isfile() else "h" if m.islnk() else "?"
            link = m.linkname if m.issym() else ""
            entries.add((path, kind, f"{m.mode & 0o7777:04o}", m.uid, m.gid, m.size if kind == "f" else 0, link))
    return entries


def check_archive_end(blob):
    """A layer must end as a tar archive does (two zero blocks; GNU tar, Python's tarfile and image scanners
    refuse a layer without them, and umoci 0.4.7's `insert` leaves them out)."""
    total, tail = 0, b""
    with gzip.open(blob) as raw:
        while chunk := raw.read(1 << 20):
            total += len(chunk)
            tail = (tail + chunk)[-1024:]
    if total % 512 or tail != bytes(1024):
        raise Mismatch(f"layer {blob}: not a complete tar archive ({total} bytes, no end-of-archive blocks)")


def layout_image(reference):
    layout, _, tag = reference.rpartition(":")

    def blob(digest):
        return os.path.join(layout, "blobs", *digest.split(":", 1))

    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    found = [m for m in index["manifests"]
             if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if len(found) != 1:
        raise Mismatch(f"{layout} has no single image tagged {tag}")
    with open(blob(found[0]["digest"])) as f:
        manifest = json.load(f)
    with open(blob(manifest["config"]["digest"])) as f:
        config = json.load(f)["config"]
    return config, [blob(layer["digest"]) for layer in manifest["layers"]]


def layer_paths(layer, present):
    """The paths image/files puts into a layer, with their parent directories. An entry flagged `linked`
    (libduckdb.so) counts only when present: a build with DuckDB compiled in leaves it out."""
    paths = set()
    for path, entry_layer, flags in image_files()[1]:
        if entry_layer != layer or ("linked" in flags and path not in present):
            continue
        while path != "/":
            paths.add(path)
            path = os.path.dirname(path)
    return paths


def compare(dockerfile, image, reference, rootfs):
    layers = image_layers(image)
    all_stages, want_config, copies = image_stage(dockerfile, image)
    check_copies(all_stages, image, layers, copies)
    config, blobs = layout_image(reference)
    if len(blobs) != len(layers):
        raise Mismatch(f"{reference} has {len(blobs)} layers, the Dockerfile's {image} {len(layers)}")
    total = 0
    for layer, blob in zip(layers, blobs):
        check_archive_end(blob)
        want, have = tree_entries(os.path.join(rootfs, layer)), tar_entries(blob)
        if want != have:
            lines = [f"  only in {rootfs}/{layer}: {e}" for e in sorted(want - have)[:20]]
            lines += [f"  only in the image's {layer} layer: {e}" for e in sorted(have - want)[:20]]
            raise Mismatch(f"the {layer} layer differs from {rootfs}/{layer}:\n" + "\n".join(lines))
        total += len(have)
        shells = sorted(e[0] for e in have if os.path.basename(e[0]) in SHELLS)
        if shells:
            raise Mismatch(f"a shell in the {layer} layer: {', '.join(shells)}")
        if layer == "base":
            print(f"  base layer: the same {len(have)} entries as the Dockerfile's COPY of {rootfs}/base/")
            continue
        paths = {e[0] for e in have}
        listed = layer_paths(layer, paths)
        if paths != listed:
            raise Mismatch(f"the {layer} layer is not image/files' {layer}: extra {sorted(paths - listed)}, "
                           f"missing {sorted(listed - paths)}")
        print(f"  {layer} layer: the same {len(have)} entries as the Dockerfile's COPY of {rootfs}/{layer}/, "
              f"exactly image/files' {layer} (with their directories)")
    for key, empty in (("User", ""), ("WorkingDir", ""), ("Entrypoint", []), ("Cmd", []), ("Env", []),
                       ("Labels", {})):
        have, want = config.get(key) or empty, want_config.get(key) or empty
        if have != want:
            raise Mismatch(f"image config {key}: {have!r}, the Dockerfile's {want!r}")
    if sorted(config.get("ExposedPorts", {})) != sorted(want_config["ExposedPorts"]):
        raise Mismatch(f"image config ExposedPorts: {config.get('ExposedPorts')}, "
                       f"the Dockerfile's {want_config['ExposedPorts']}")
    print(f"  no shell; configuration as the Dockerfile's stage {image}: user {config.get('User')}, "
          f"entrypoint {config.get('Entrypoint')} {config.get('Cmd') or ''}; {total} entries in all")


def main(argv):
    try:
        if argv[1:2] == ["config"] and len(argv) == 4:
            print("\n".join(umoci_config_args(argv[2], argv[3])))
        elif argv[1:2] == ["compare"] and len(argv) == 6:
            compare(argv[2], argv[3], argv[4], argv[5])
        elif argv[1:2] == ["layers"] and len(argv) == 3:
            print("\n".join(image_layers(argv[2])))
        elif argv[1:2] == ["paths"] and len(argv) == 3:
            layers = image_layers(argv[2])
            print("\n".join(path for path, layer, _ in image_files()[1] if layer in layers))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Mismatch as e:
        print(f"imagecheck: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
