"""`ferret` command line: subcommands are filled in by the serving and inference modules."""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    print("ferret: not yet implemented", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
