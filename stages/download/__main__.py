from stages.download.stage import main

main()
