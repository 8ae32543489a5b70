"""What a ``grub.cfg`` boots by default: the kernel, the initrds and the command line of its
default menu entry, as GRUB would choose them with no one at the keyboard.

This is not a GRUB script interpreter. It reads the configurations that grub-mkconfig writes
(Debian, Ubuntu) and hand-written ones in the same style. Boot Loader Specification entries
(``blscfg``, Fedora's /boot/loader/entries) are not read: such a grub.cfg has no menuentry,
and says so. What it follows:

- words, quotes (``'...'``, ``"..."`` with ``$var``), backslashes, ``#`` comments, ``;``;
- ``set name=value`` and ``name=value``; ``load_env`` (the ``grubenv`` beside the config, for
  ``saved_entry``/``next_entry``); an unset variable expands to nothing, as in GRUB;
- ``if``/``elif``/``else``/``fi`` with ``[ ... ]`` tests (``-n``, ``-z``, ``-s``/``-f``/``-e``
  on a file, ``=``, ``!=``, a bare string), GRUB's own ``feature_*`` variables set as a current
  GRUB sets them; a condition that is a command (``loadfont``) counts as true; loops never run
  (grub-mkconfig writes none);
- ``menuentry`` and ``submenu`` blocks (title, ``--id``/``$menuentry_id_option``), ``function``
  blocks skipped;
- ``set default=`` as a number, title or id, or a ``>``-separated path into submenus;
  GRUB's rule: a default that names no entry means the first; a submenu means its first entry;
- in the entry: ``search --fs-uuid|--label|--file [--set=VAR] KEY`` (and ``search.fs_uuid KEY
  VAR``...), ``set root=``, ``linux``/``linuxefi``/``linux16`` PATH ARGS, ``initrd``... PATHS;
- paths ``/p`` (on ``$root``), ``(hd0,gpt2)/p``, ``(hd0,msdos1)/p``, ``($root)/p``;
- ``configfile`` and ``source`` (at the top or in the entry), followed up to
  :data:`MAX_DEPTH` deep; a configuration that leads back to itself is an error.

Everything it cannot follow -- a device other than the booted disk, a ``search`` that finds
nothing, a path that does not exist, a loop -- is a :class:`~vdiskfs.errors.FormatError` naming
the configuration file and what is wrong, never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from vdiskfs.errors import FormatError

__all__ = ["Devices", "GrubChoice", "choose_entry"]

#: configfile/source nesting followed.
MAX_DEPTH = 8
#: Largest grub.cfg or grubenv read.
MAX_CONFIG = 1 << 20
#: Blocks and ifs nested in one another (grub-mkconfig writes 3 or 4).
MAX_NESTING = 32

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|\?")
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)
_DEVICE = re.compile(r"hd(\d+)(?:,(?:gpt|msdos)?(\d+))?")
_KERNEL_COMMANDS = ("linux", "linuxefi", "linux16")
_INITRD_COMMANDS = ("initrd", "initrdefi", "initrd16")
#: menuentry/submenu options that take a value.
_OPTIONS_WITH_VALUE = ("--class", "--users", "--hotkey", "--id")
#: The short forms of search's options.
_SEARCH_KINDS = {"--fs-uuid": "fs-uuid", "-u": "fs-uuid", "--label": "label", "-l": "label",
                 "--file": "file", "-f": "file"}


class Devices(Protocol):
    """The booted disk as the reader sees it: partitions by number (None: the whole disk)."""

    def describe(self, part: int | None) -> str:
        """A name for messages (``"disk.qcow2 partition 1"``)."""

    def read(self, part: int | None, path: str, limit: int) -> bytes:
        """The file's bytes; FormatError if it is missing or unreadable."""

    def is_file(self, part: int | None, path: str) -> bool:
        """A regular file is there (False for a partition without a readable file system)."""

    def find(self, kind: str, key: str) -> int | bool | None:
        """The partition that ``search`` finds (``kind``: fs-uuid, label or file): its number,
        None for the whole disk, False when none matches."""


@dataclass(frozen=True)
class Location:
    """A file on the booted disk."""

    part: int | None
    path: str


@dataclass(frozen=True)
class GrubChoice:
    """The default entry's boot: what to load and where the configuration said so."""

    title: str
    kernel: Location
    initrds: tuple[Location, ...]
    cmdline: str
    #: The configuration file whose entry this is.
    config: Location


# -- lexing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Var:
    name: str


@dataclass
class _Word:
    parts: list[str | _Var] = field(default_factory=list)
    #: Some of it was quoted: ``'{'`` is not a brace.
    quoted: bool = False

    def bare(self) -> str | None:
        """The word's text when it is one unquoted literal (``{``, ``}``, keywords)."""
        if self.quoted or len(self.parts) != 1 or not isinstance(self.parts[0], str):
            return None
        return self.parts[0]

    def expand(self, env: dict[str, str]) -> str:
        return "".join(p if isinstance(p, str) else env.get(p.name, "") for p in self.parts)


@dataclass
class _Command:
    words: list[_Word]
    line: int


@dataclass
class _Block:
    """``menuentry ... { body }`` and the like: the head's words, the body's statements."""

    head: list[_Word]
    body: list[_Statement]
    line: int


@dataclass
class _If:
    """``if C; then ...; elif C; then ...; else ...; fi``: (condition or None, body) pairs.
    A loop is an ``_If`` with no branch: its body never runs (grub-mkconfig writes none)."""

    branches: list[tuple[list[_Word] | None, list[_Statement]]]
    line: int


_Statement = _Command | _Block | _If


def _lex(text: str, where: str) -> list[_Command]:
    """The commands of a GRUB script, one per line or ``;``."""
    commands: list[_Command] = []
    words: list[_Word] = []
    word: _Word | None = None
    line, start_line = 1, 1
    i, n = 0, len(text)

    def literal(s: str) -> None:
        nonlocal word
        if word is None:
            word = _Word()
        if word.parts and isinstance(word.parts[-1], str):
            word.parts[-1] += s
        else:
            word.parts.append(s)

    def variable(at: int) -> int:
        """``$name`` or ``${name}`` at ``at`` (the ``$``); the index after it."""
        nonlocal word
        if word is None:
            word = _Word()
        if text.startswith("{", at + 1):
            end = text.find("}", at + 2)
            if end < 0:
                raise FormatError(f"line {line}: unterminated ${{", path=where)
            word.parts.append(_Var(text[at + 2:end]))
            return end + 1
        match = _NAME.match(text, at + 1)
        if match is None:
            literal("$")
            return at + 1
        word.parts.append(_Var(match.group()))
        return match.end()

    def end_word() -> None:
        nonlocal word
        if word is not None:
            words.append(word)
            word = None

    def end_command() -> None:
        nonlocal words
        end_word()
        if words:
            commands.append(_Command(words, start_line))
        words = []

    while i < n:
        c = text[i]
        if c == "\n":
            end_command()
            line += 1
            start_line = line
            i += 1
        elif c in " \t\r":
            end_word()
            i += 1
        elif c == ";":
            end_command()
            i += 1
        elif c == "#" and word is None:
            while i < n and text[i] != "\n":
                i += 1
        elif c == "\\":
            if i + 1 < n and text[i + 1] == "\n":
                line += 1
            elif i + 1 < n:
                literal(text[i + 1])
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise FormatError(f"line {line}: unterminated ' quote", path=where)
            literal(text[i + 1:end])
            assert word is not None
            word.quoted = True
            line += text.count("\n", i, end)
            i = end + 1
        elif c == '"':
            literal("")
            assert word is not None
            word.quoted = True
            i += 1
            while True:
                if i >= n:
                    raise FormatError(f"line {line}: unterminated \" quote", path=where)
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\$\n':
                    if text[i + 1] != "\n":
                        literal(text[i + 1])
                    i += 2
                elif c == "$":
                    i = variable(i)
                else:
                    if c == "\n":
                        line += 1
                    literal(c)
                    i += 1
        elif c == "$":
            i = variable(i)
        else:
            literal(c)
            i += 1
    end_command()
    return commands


def _parse(text: str, where: str) -> list[_Statement]:
    """Statements with ``{ ... }`` blocks and ``if ... fi`` nested."""
    top: list[_Statement] = []
    # Open constructs, innermost last: (the construct, the body statements go to).
    stack: list[tuple[_Block | _If | None, list[_Statement]]] = [(None, top)]
    for command in _lex(text, where):
        words = command.words
        while words:
            if len(stack) > MAX_NESTING:
                raise FormatError(f"line {command.line}: blocks nested more than "
                                  f"{MAX_NESTING} deep", path=where)
            first = words[0].bare()
            construct, body = stack[-1]
            if first == "}":
                if not isinstance(construct, _Block):
                    raise FormatError(f"line {command.line}: '}}' without a block to close",
                                      path=where)
                stack.pop()
                words = words[1:]
            elif first in ("if", "while", "until", "for"):
                node = _If([(words[1:], [])] if first == "if" else [], command.line)
                body.append(node)
                stack.append((node, node.branches[0][1] if node.branches else []))
                break
            elif first in ("then", "do"):
                words = words[1:]
            elif first in ("elif", "else"):
                if not isinstance(construct, _If):
                    raise FormatError(f"line {command.line}: {first} without if", path=where)
                branch: list[_Statement] = []
                if construct.branches:  # a loop has none, and keeps none
                    construct.branches.append((words[1:] if first == "elif" else None, branch))
                stack[-1] = (construct, branch)
                words = [] if first == "elif" else words[1:]
            elif first in ("fi", "done"):
                if not isinstance(construct, _If):
                    raise FormatError(f"line {command.line}: {first} without if", path=where)
                stack.pop()
                words = words[1:]
            else:
                # A brace is a word of its own, anywhere: "menuentry x { linux /k }".
                brace = next((k for k, w in enumerate(words) if w.bare() in ("{", "}")),
                             len(words))
                if brace < len(words) and words[brace].bare() == "{":
                    block = _Block(words[:brace], [], command.line)
                    body.append(block)
                    stack.append((block, block.body))
                    words = words[brace + 1:]
                else:
                    body.append(_Command(words[:brace], command.line))
                    words = words[brace:]
    if len(stack) > 1:
        construct = stack[-1][0]
        assert construct is not None
        what = "block never closed with '}'" if isinstance(construct, _Block) else \
            "if without fi"
        raise FormatError(f"line {construct.line}: {what}", path=where)
    return top


# -- evaluation -------------------------------------------------------------------------------

#: What GRUB itself sets: a current GRUB's features (grub-mkconfig tests them), a BIOS boot.
_GRUB_ENV = {
    **{f"feature_{f}": "y" for f in ("menuentry_id", "platform_search_hint", "all_video_module",
                                     "default_font_path", "timeout_style", "chainloader_bpb",
                                     "ntldr", "menuentry_options", "200_final", "nativedisk_cmd",
                                     "tpm2_cmd")},
    "grub_platform": "pc",
    "grub_cpu": "i386",
}


def _walk(statements: list[_Statement],
          test: Callable[[list[_Word]], bool | None]) -> Iterator[_Command | _Block]:
    """The commands and blocks that run, in order: of an ``if``, the first branch whose
    condition holds, or cannot be told (``test`` None: a command as the condition), runs.
    A generator, so each condition sees the assignments run before it."""
    for statement in statements:
        if isinstance(statement, _If):
            for condition, body in statement.branches:
                if condition is None or test(condition) is not False:
                    yield from _walk(body, test)
                    break
        else:
            yield statement


def _expand(words: list[_Word], env: dict[str, str]) -> list[str]:
    """The words as GRUB passes them: an unquoted word that expands to nothing is no word."""
    out = []
    for word in words:
        text = word.expand(env)
        if text or word.quoted:
            out.append(text)
    return out


@dataclass
class _Entry:
    title: str
    id: str
    block: _Block
    is_submenu: bool


def _entry_head(block: _Block, env: dict[str, str]) -> tuple[str, str]:
    """(title, id) of a menuentry/submenu head (its first word is the keyword)."""
    title, entry_id = "", ""
    words = block.head[1:]
    i = 0
    while i < len(words):
        text = words[i].expand(env)
        if text.startswith("--"):
            option, eq, value = text.partition("=")
            if option in _OPTIONS_WITH_VALUE and not eq:
                value = words[i + 1].expand(env) if i + 1 < len(words) else ""
                i += 1
            if option == "--id":
                entry_id = value
        elif not title:
            title = text
        i += 1
    return title, entry_id


def _as_entry(block: _Block, env: dict[str, str]) -> _Entry | None:
    """A menuentry or submenu block as an entry; None for other blocks (functions)."""
    keyword = block.head[0].bare() if block.head else None
    if keyword not in ("menuentry", "submenu"):
        return None
    title, entry_id = _entry_head(block, env)
    return _Entry(title, entry_id, block, keyword == "submenu")


def _parse_grubenv(data: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in data.decode("utf-8", "replace").splitlines():
        if raw.startswith("#"):
            continue
        key, eq, value = raw.partition("=")
        if eq and _NAME.fullmatch(key):
            env[key] = value
    return env


class _Reader:
    """One search for the default entry: the configurations on the way, loop detection."""

    def __init__(self, devices: Devices) -> None:
        self.devices = devices
        #: Why the last ``search`` for each variable found nothing, for the error it causes.
        self.failed_search: dict[str, str] = {}

    def describe(self, loc: Location) -> str:
        return f"{self.devices.describe(loc.part)}: {loc.path}"

    def device(self, text: str, where: str) -> int | None:
        match = _DEVICE.fullmatch(text)
        if match is None:
            raise FormatError(f"device ({text}): not a partition of the booted disk "
                              "(hd0,gptN or hd0,msdosN)", path=where)
        if match.group(1) != "0":
            raise FormatError(f"device ({text}): only the booted disk (hd0) is read",
                              path=where)
        return None if match.group(2) is None else int(match.group(2))

    def resolve(self, path: str, env: dict[str, str], where: str) -> Location:
        """``(dev)/p`` or ``/p`` on ``$root``."""
        if path.startswith("("):
            close = path.find(")")
            if close < 0:
                raise FormatError(f"path {path!r}: no closing ')'", path=where)
            part = self.device(path[1:close], where)
            rest = path[close + 1:]
        else:
            root = env.get("root", "")
            part = self.device(root.strip("()"), where) if root else None
            rest = path
        if not rest.startswith("/"):
            raise FormatError(f"path {path!r} is not absolute", path=where)
        return Location(part, rest)

    def must_exist(self, loc: Location, what: str, env: dict[str, str], where: str) -> None:
        if self.devices.is_file(loc.part, loc.path):
            return
        why = self.failed_search.get("root", "")
        raise FormatError(f"{what} {loc.path} is not a file on "
                          f"{self.devices.describe(loc.part)}{why}", path=where)

    def search(self, words: list[str], env: dict[str, str], where: str) -> None:
        """``search`` (or ``search.fs_uuid KEY VAR``...): set the variable to the device."""
        command, args = words[0], words[1:]
        kind, var, key = "", "root", ""
        if command != "search":
            kind = {"search.fs_uuid": "fs-uuid", "search.fs_label": "label",
                    "search.file": "file"}[command]
            key = args[0] if args else ""
            var = args[1] if len(args) > 1 else "root"
        else:
            i = 0
            while i < len(args):
                arg = args[i]
                if arg in _SEARCH_KINDS:
                    kind = _SEARCH_KINDS[arg]
                elif arg == "--set" or arg.startswith("--set="):
                    var = arg.partition("=")[2] or "root"
                elif arg == "-s":
                    if i + 1 < len(args) and not args[i + 1].startswith("-"):
                        var = args[i + 1]
                        i += 1
                elif arg.startswith("--hint") and "=" not in arg:
                    i += 1  # its value is the next word
                elif not arg.startswith("-"):
                    key = arg
                i += 1
        if not kind or not key:
            return
        found = self.devices.find(kind, key)
        if found is False:
            self.failed_search[var] = (f" (search --{kind} {key} found no such file system "
                                       "on the disk)")
            return
        self.failed_search.pop(var, None)
        env[var] = "hd0" if found is None else f"hd0,{found}"

    def read_config(self, loc: Location, chain: tuple[Location, ...]) -> tuple[
            list[_Statement], tuple[Location, ...]]:
        if loc in chain:
            names = " -> ".join(self.describe(c) for c in (*chain, loc))
            raise FormatError(f"configuration loops: {names}", path=self.describe(chain[0]))
        if len(chain) >= MAX_DEPTH:
            raise FormatError(f"configfile/source nested more than {MAX_DEPTH} deep",
                              path=self.describe(chain[0]))
        where = self.describe(loc)
        text = self.devices.read(loc.part, loc.path, MAX_CONFIG).decode("utf-8", "replace")
        return _parse(text, where), (*chain, loc)

    def run_config(self, loc: Location, env: dict[str, str],
                   chain: tuple[Location, ...]) -> GrubChoice:
        """Evaluate a configuration as ``configfile`` does and boot its default entry."""
        statements, chain = self.read_config(loc, chain)
        for key, value in _GRUB_ENV.items():
            env.setdefault(key, value)
        env.setdefault("root", "hd0" if loc.part is None else f"hd0,{loc.part}")
        env.setdefault("prefix", f"({env['root']}){loc.path.rsplit('/', 1)[0] or '/'}")
        entries: list[_Entry] = []
        redirect = self.run_top(statements, env, entries, loc, chain)
        if redirect is not None:
            return redirect
        if not entries:
            raise FormatError("no menuentry", path=self.describe(loc))
        entry = self.default_entry(entries, env, loc)
        return self.run_entry(entry, dict(env), loc, chain)

    def test(self, condition: list[_Word], env: dict[str, str], where: str) -> bool | None:
        """An ``if`` condition of the ``[ ... ]`` kind; None for anything else (a command)."""
        args = _expand(condition, env)
        if len(args) < 2 or args[0] not in ("[", "test") or (args[0] == "[") != (
                args[-1] == "]"):
            return None
        args = args[1:-1] if args[0] == "[" else args[1:]
        if len(args) == 1:
            return args[0] != ""
        if len(args) == 2:
            op, arg = args
            if op in ("-n", "-z"):
                return (arg != "") == (op == "-n")
            if op in ("-s", "-f", "-e"):
                try:
                    loc = self.resolve(arg, env, where)
                except FormatError:
                    return False
                return self.devices.is_file(loc.part, loc.path)
        if len(args) == 3 and args[1] in ("=", "==", "!="):
            return (args[0] == args[2]) == (args[1] != "!=")
        return None

    def run_top(self, statements: list[_Statement], env: dict[str, str],
                entries: list[_Entry], loc: Location,
                chain: tuple[Location, ...]) -> GrubChoice | None:
        """Top-level statements; a GrubChoice when a ``configfile`` took over."""
        for statement in self.commands(statements, env, self.describe(loc)):
            if isinstance(statement, _Block):
                if (entry := _as_entry(statement, env)) is not None:
                    entries.append(entry)
                continue
            words, line_where = statement
            command = words[0]
            if command == "load_env":
                self.load_env(words, env, line_where)
            elif command.startswith("search"):
                self.search(words, env, line_where)
            elif command in ("configfile", "source", ".") and len(words) > 1:
                target = self.resolve(words[1], env, line_where)
                if command == "configfile":
                    return self.run_config(target, dict(env), chain)
                self.must_exist(target, command, env, line_where)
                included, deeper = self.read_config(target, chain)
                choice = self.run_top(included, env, entries, target, deeper)
                if choice is not None:
                    return choice
        return None

    def assign(self, words: list[str], env: dict[str, str]) -> bool:
        """``set a=b`` or ``a=b``: done and True; anything else False."""
        if words[0] == "set":
            if len(words) > 1 and (match := _ASSIGNMENT.fullmatch(words[1])):
                env[match.group(1)] = match.group(2)
            return True
        if len(words) == 1 and (match := _ASSIGNMENT.fullmatch(words[0])):
            env[match.group(1)] = match.group(2)
            return True
        return False

    def load_env(self, words: list[str], env: dict[str, str], where: str) -> None:
        path = f"{env.get('prefix', '')}/grubenv"
        if "-f" in words[:-1]:
            path = words[words.index("-f") + 1]
        elif any(w.startswith("--file=") for w in words):
            path = next(w for w in words if w.startswith("--file="))[len("--file="):]
        loc = self.resolve(path, env, where)
        if self.devices.is_file(loc.part, loc.path):
            env.update(_parse_grubenv(self.devices.read(loc.part, loc.path, MAX_CONFIG)))

    def default_entry(self, entries: list[_Entry], env: dict[str, str], loc: Location) -> _Entry:
        """GRUB's choice for ``$default``: by index, id or title, ``>`` into submenus; the
        first entry when it names none; a submenu's first entry."""
        default = env.get("default", "")
        level = entries
        entry = level[0]
        for step in default.split(">") if default else []:
            if step.isdigit():
                index = int(step)
                match = level[index] if index < len(level) else None
            else:
                match = next((e for e in level if step in (e.id, e.title)), None)
            if match is None:
                # GRUB boots the first entry when the default names none.
                entry = entries[0]
                break
            entry = match
            if not entry.is_submenu:
                break
            level = self.submenu_entries(entry, env, loc)
        while entry.is_submenu:
            children = self.submenu_entries(entry, env, loc)
            if not children:
                raise FormatError(f"submenu {entry.title!r} has no entries",
                                  path=self.describe(loc))
            entry = children[0]
        return entry

    def submenu_entries(self, entry: _Entry, env: dict[str, str], loc: Location) -> list[_Entry]:
        blocks = (s for s in self.commands(entry.block.body, dict(env), self.describe(loc))
                  if isinstance(s, _Block))
        return [e for b in blocks if (e := _as_entry(b, env)) is not None]

    def commands(self, statements: list[_Statement], env: dict[str, str],
                 where: str) -> Iterator[_Block | tuple[list[str], str]]:
        """What runs, in order: blocks as they are, commands expanded with the line they are
        on (``where``: the file or entry); assignments are done here and not yielded."""
        for statement in _walk(statements, lambda c: self.test(c, env, where)):
            if isinstance(statement, _Block):
                yield statement
                continue
            words = _expand(statement.words, env)
            if words and not self.assign(words, env):
                yield words, f"{where}: line {statement.line}"

    def run_entry(self, entry: _Entry, env: dict[str, str], loc: Location,
                  chain: tuple[Location, ...]) -> GrubChoice:
        where = f"{self.describe(loc)}: menu entry {entry.title!r}"
        kernel: Location | None = None
        cmdline = ""
        initrds: list[Location] = []
        for statement in self.commands(entry.block.body, env, where):
            if isinstance(statement, _Block):
                continue
            words, line_where = statement
            command = words[0]
            if command.startswith("search"):
                self.search(words, env, line_where)
            elif command in _KERNEL_COMMANDS:
                if len(words) < 2:
                    raise FormatError(f"{command} without a kernel", path=line_where)
                kernel = self.resolve(words[1], env, line_where)
                self.must_exist(kernel, "kernel", env, line_where)
                cmdline = " ".join(w for w in words[2:] if w)
            elif command in _INITRD_COMMANDS:
                initrds = []
                for path in words[1:]:
                    # An initrd option (Debian's "--nounzip") is not a path.
                    if path.startswith("--"):
                        continue
                    initrd = self.resolve(path, env, line_where)
                    self.must_exist(initrd, "initrd", env, line_where)
                    initrds.append(initrd)
            elif command == "configfile" and len(words) > 1:
                return self.run_config(self.resolve(words[1], env, line_where), dict(env),
                                       chain)
        if kernel is None:
            raise FormatError("no linux command: nothing to boot", path=where)
        return GrubChoice(entry.title, kernel, tuple(initrds), cmdline, loc)


def choose_entry(devices: Devices, config: Location) -> GrubChoice:
    """The default entry of the ``grub.cfg`` at ``config``, followed to its kernel."""
    return _Reader(devices).run_config(config, {}, ())
