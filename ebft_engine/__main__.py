import sys

if __name__ == "__main__":
    try:
        from .cli import main  # torch and transformers load here: seconds in which Ctrl-C may land

        code = main()
    except KeyboardInterrupt:  # before the engine's own handler took over: nothing was started
        print("cancelled before the run started", file=sys.stderr)
        code = 130
    sys.exit(code)
