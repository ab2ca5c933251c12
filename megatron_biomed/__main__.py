"""`python -m megatron_biomed <command> [flags]`: the same tools as the `megatron-biomed-*` commands."""
import sys

from megatron_biomed.commands import COMMANDS, PREFIX, main_of


def usage(stream):
    print("usage: python -m megatron_biomed <command> [--help | flags]\n\ncommands "
          f"(also installed as {PREFIX}<command>):", file=stream)
    for name, (_, _, what) in COMMANDS.items():
        print(f"  {name:<16} {what}", file=stream)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        usage(sys.stdout)
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: {argv[0]}: not a command; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"{PREFIX}{argv[0]}"
    return main_of(argv[0])(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
