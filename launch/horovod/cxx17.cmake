# Included after every project() of Horovod's CMake build (CMAKE_PROJECT_INCLUDE, set by
# cmake-cxx17): whatever asks for C++14 is compiled as C++17, which torch >= 2.1 headers need.
set(CMAKE_CXX14_STANDARD_COMPILE_OPTION "-std=c++17")
set(CMAKE_CXX14_EXTENSION_COMPILE_OPTION "-std=gnu++17")
