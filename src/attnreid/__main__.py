from attnreid.cli import main

main()
