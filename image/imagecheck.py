"""The Dockerfile and the image scripts/build-image assembles, held to each other.

    python3 image/imagecheck.py config Dockerfile
        umoci config arguments for the Dockerfile's last stage (user, working directory, environment,
        ports, entrypoint, command, labels), one per line: scripts/build-image applies them.
    python3 image/imagecheck.py compare Dockerfile LAYOUT:TAG ROOTFS
        checks that the Dockerfile's image and the assembled OCI image have the same files: the
        Dockerfile's last stage must be `FROM scratch` plus one COPY of each of ROOTFS's layer directories
        (base, app) that its build stage makes with scripts/build-image, and nothing else; each layer of
        the image at LAYOUT:TAG must hold exactly the files of that directory (path, type, mode, owner,
        size, link target); the app layer exactly image/files; no shell anywhere; and the image's
        configuration is the Dockerfile's.

Only the Dockerfile instructions its last stage uses are understood; any other one is an error, so that a
change to the Dockerfile cannot silently make the two images differ. Python's standard library only.
"""

import gzip
import json
import os
import shlex
import stat
import sys
import tarfile

LAYERS = ("base", "app")
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


def final_stage(dockerfile):
    """The last stage's configuration and its COPY lines, refusing anything else."""
    all_stages = stages(dockerfile)
    name, body = all_stages[-1]
    if body[0][1].split()[0] != "scratch":
        raise Mismatch(f"the last stage must be FROM scratch, not FROM {body[0][1]}")
    config = {"Env": [], "Labels": {}, "ExposedPorts": []}
    copies = []
    for word, rest in body[1:]:
        if word == "COPY":
            copies.append(rest.split())
        elif word == "LABEL":
            config["Labels"].update(key_values(rest))
        elif word == "ENV":
            config["Env"] += [f"{k}={v}" for k, v in key_values(rest)]
        elif word == "USER":
            config["User"] = rest
        elif word == "WORKDIR":
            config["WorkingDir"] = rest
        elif word == "EXPOSE":
            config["ExposedPorts"] += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
        elif word in ("ENTRYPOINT", "CMD"):
            if not rest.startswith("["):
                raise Mismatch(f"{word} must be in the exec (JSON) form: {rest}")
            config["Entrypoint" if word == "ENTRYPOINT" else "Cmd"] = json.loads(rest)
        else:
            raise Mismatch(f"the last stage's {word} is not understood by image/imagecheck.py: "
                           "the assembled image would not have it")
    return all_stages, config, copies


def umoci_config_args(dockerfile):
    _, config, _ = final_stage(dockerfile)
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


def check_copies(all_stages, copies):
    """The last stage copies exactly ROOT/base/ and ROOT/app/, in that order, from the stage that runs
    scripts/build-image --rootfs ROOT."""
    builders = {}
    for name, body in all_stages[:-1]:
        for word, rest in body:
            if word == "RUN" and "scripts/build-image" in rest:
                tokens = shlex.split(rest)
                if "--rootfs" in tokens and "--layout" not in tokens:
                    builders[name] = tokens[tokens.index("--rootfs") + 1].rstrip("/")
    if len(copies) != len(LAYERS):
        raise Mismatch(f"the last stage must COPY exactly {len(LAYERS)} directories, found {len(copies)}")
    for layer, args in zip(LAYERS, copies):
        options = [a for a in args if a.startswith("--")]
        paths = [a for a in args if not a.startswith("--")]
        source = next((o.split("=", 1)[1] for o in options if o.startswith("--from=")), None)
        if source not in builders:
            raise Mismatch(f"COPY {' '.join(args)}: not from a stage that runs scripts/build-image --rootfs")
        want = [f"{builders[source]}/{layer}/", "/"]
        if paths != want or any(not o.startswith("--from=") for o in options):
            raise Mismatch(f"COPY {' '.join(args)}: expected COPY --from={source} {' '.join(want)}")


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


def manifest_paths(files, present):
    """The paths image/files lists, with their parent directories. An entry flagged `linked` (libduckdb.so)
    counts only when present: a build with DuckDB compiled in leaves it out."""
    paths = set()
    with open(files) as f:
        for line in f:
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            path = fields[0]
            if len(fields) > 4 and "linked" in fields[4].split(",") and path not in present:
                continue
            while path != "/":
                paths.add(path)
                path = os.path.dirname(path)
    return paths


def compare(dockerfile, reference, rootfs):
    all_stages, want_config, copies = final_stage(dockerfile)
    check_copies(all_stages, copies)
    config, blobs = layout_image(reference)
    if len(blobs) != len(LAYERS):
        raise Mismatch(f"{reference} has {len(blobs)} layers, the Dockerfile {len(LAYERS)}")
    total = 0
    for layer, blob in zip(LAYERS, blobs):
        want, have = tree_entries(os.path.join(rootfs, layer)), tar_entries(blob)
        if want != have:
            lines = [f"  only in {rootfs}/{layer}: {e}" for e in sorted(want - have)[:20]]
            lines += [f"  only in the image's {layer} layer: {e}" for e in sorted(have - want)[:20]]
            raise Mismatch(f"the {layer} layer differs from {rootfs}/{layer}:\n" + "\n".join(lines))
        print(f"  {layer} layer: the same {len(have)} entries as the Dockerfile's COPY of {rootfs}/{layer}/")
        total += len(have)
        shells = sorted(e[0] for e in have if os.path.basename(e[0]) in SHELLS)
        if shells:
            raise Mismatch(f"a shell in the {layer} layer: {', '.join(shells)}")
        if layer == "app":
            paths = {e[0] for e in have}
            listed = manifest_paths("image/files", paths)
            if paths != listed:
                raise Mismatch(f"the app layer is not image/files: extra {sorted(paths - listed)}, "
                               f"missing {sorted(listed - paths)}")
            print(f"  app layer: exactly the {len(listed)} paths of image/files (with their directories)")
    for key, empty in (("User", ""), ("WorkingDir", ""), ("Entrypoint", []), ("Cmd", []), ("Env", []),
                       ("Labels", {})):
        have, want = config.get(key) or empty, want_config.get(key) or empty
        if have != want:
            raise Mismatch(f"image config {key}: {have!r}, the Dockerfile's {want!r}")
    if sorted(config.get("ExposedPorts", {})) != sorted(want_config["ExposedPorts"]):
        raise Mismatch(f"image config ExposedPorts: {config.get('ExposedPorts')}, "
                       f"the Dockerfile's {want_config['ExposedPorts']}")
    print(f"  no shell; configuration as the Dockerfile's last stage: user {config.get('User')}, "
          f"entrypoint {config.get('Entrypoint')} {config.get('Cmd')}; {total} entries in all")


def main(argv):
    try:
        if argv[1:2] == ["config"] and len(argv) == 3:
            print("\n".join(umoci_config_args(argv[2])))
        elif argv[1:2] == ["compare"] and len(argv) == 5:
            compare(argv[2], argv[3], argv[4])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Mismatch as e:
        print(f"imagecheck: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
