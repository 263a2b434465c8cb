from stages.train.stage import main

main()
