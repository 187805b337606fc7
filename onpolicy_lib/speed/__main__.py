"""``python -m onpolicy_lib.speed``: see :mod:`onpolicy_lib.speed`."""

from onpolicy_lib.speed import main

if __name__ == "__main__":
    main()
