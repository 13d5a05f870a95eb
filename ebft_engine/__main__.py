import os
import sys

# A reader that went away (`| head -1`): the exit status a shell shows for a process SIGPIPE ended, 128 + 13.
CLOSED_PIPE = 141

if __name__ == "__main__":
    try:
        from .cli import main  # torch and transformers load here: seconds in which Ctrl-C may land

        code = main()
        sys.stdout.flush()  # here, not at exit: a closed pipe raises now, where it is handled
    except KeyboardInterrupt:  # before the engine's own handler took over: nothing was started
        print("cancelled before the run started", file=sys.stderr)
        code = 130
    except OSError as e:  # stdout cannot take what is left: the exit's own flush must find nothing to fail on
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(e, BrokenPipeError):  # its reader closed it: stop quietly (the Python docs' recipe)
            code = CLOSED_PIPE
        else:  # it cannot be written (a full disk): one line, not a traceback
            print(f"error: the output cannot be written ({e.strerror}); send it where there is room",
                  file=sys.stderr)
            code = 2
    sys.exit(code)
