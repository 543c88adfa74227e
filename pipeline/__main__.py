import gc

from pipeline.cli import main

if __name__ == "__main__":
    main()
    # The process ends here: what the command left is freed with it, and frozen it is spared
    # the final collection Python runs over every tracked object at exit.
    gc.freeze()
