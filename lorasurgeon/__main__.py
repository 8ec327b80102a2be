from lorasurgeon.cli import main

main()
